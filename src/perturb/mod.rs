//! Perturbation experiments: operations on regions with exact restore, control regions,
//! single-dimension norm scans, structured (whole hidden dimension) perturbation, generation
//! specs and super-weight search.

pub mod ablate;
pub mod dims;
pub mod ops;
pub mod plot;
pub mod scan;
pub mod select;
pub mod spec;
pub mod structured;
pub mod superweights;
