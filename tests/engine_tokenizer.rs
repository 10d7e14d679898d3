//! Tokenizers built from GGUF metadata: chunked parallel encoding of long texts equals
//! encoding them in one piece, and decoding gives back the text.

mod common;

use broca::tokenizer::Tokenizer;
use common::{asset, fixture, gguf_tokenizer, read, QWEN, SMOLLM};

/// The first `n` bytes of a text, cut back to a character boundary.
fn prefix(text: &str, n: usize) -> &str {
    let mut end = n.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn check_chunked_encoding(tok: &Tokenizer, model: &str) {
    for lang in ["en", "zh"] {
        let text = read(&asset(&format!("bible/{lang}.txt")));
        let text = prefix(&text, 200_000);
        let chunked = tok.encode(text).unwrap();
        let whole: Vec<u32> = tok
            .bos
            .into_iter()
            .chain(
                tok.inner
                    .encode(text, false)
                    .unwrap()
                    .get_ids()
                    .iter()
                    .copied(),
            )
            .collect();
        assert!(
            whole.len() > 10_000,
            "{model} {lang}: only {} tokens",
            whole.len()
        );
        if chunked != whole {
            let at = chunked
                .iter()
                .zip(&whole)
                .position(|(a, b)| a != b)
                .unwrap_or(chunked.len().min(whole.len()));
            panic!(
                "{model} bible/{lang}: chunked encoding ({} ids) differs from one-piece ({} ids) at id {at}",
                chunked.len(),
                whole.len()
            );
        }
    }
}

#[test]
fn smollm2_chunked_encoding_is_exact() {
    check_chunked_encoding(&gguf_tokenizer(SMOLLM), SMOLLM);
}

#[test]
fn qwen2_chunked_encoding_is_exact() {
    check_chunked_encoding(&gguf_tokenizer(QWEN), QWEN);
}

#[test]
fn decode_inverts_encode() {
    for model in [SMOLLM, QWEN] {
        let tok = gguf_tokenizer(model);
        for name in [
            "udhr-en.txt",
            "udhr-zh.txt",
            "udhr-ar.txt",
            "udhr-ru.txt",
            "udhr-de.txt",
        ] {
            let text = read(&fixture(name));
            let ids = tok.encode(&text).unwrap();
            let ids = &ids[tok.bos.is_some() as usize..];
            assert_eq!(
                tok.decode(ids).unwrap(),
                text,
                "{model} {name}: decode(encode(x)) != x"
            );
        }
    }
}
