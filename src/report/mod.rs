//! Self-contained HTML reports: sections, tables, inline SVG charts and inline PNG images.
//! No scripts and no network: the file opens anywhere.

pub mod svg;

use svg::esc;

/// One `<section>` with an `<h2>` heading.
pub struct Section {
    pub title: String,
    pub body: String,
}

/// A report under construction.
pub struct Report {
    pub title: String,
    pub sections: Vec<Section>,
}

impl Report {
    /// An empty report.
    pub fn new(title: &str) -> Report {
        Report {
            title: title.to_string(),
            sections: Vec::new(),
        }
    }

    /// Appends a section.
    pub fn section(&mut self, title: &str, body: String) {
        self.sections.push(Section {
            title: title.to_string(),
            body,
        });
    }

    /// The whole document.
    pub fn render(&self) -> String {
        let mut s =
            String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        s += &format!("<title>{}</title>\n", esc(&self.title));
        s += "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}\
figure{margin:1em 0;overflow-x:auto}figcaption{font-size:12px;color:#555}img{max-width:100%;image-rendering:pixelated}\
nav a{margin-right:1em}</style>\n</head>\n<body>\n";
        s += &format!("<h1>{}</h1>\n<nav>", esc(&self.title));
        for (i, sec) in self.sections.iter().enumerate() {
            s += &format!("<a href=\"#s{i}\">{}</a>", esc(&sec.title));
        }
        s += "</nav>\n";
        for (i, sec) in self.sections.iter().enumerate() {
            s += &format!(
                "<section id=\"s{i}\">\n<h2>{}</h2>\n{}\n</section>\n",
                esc(&sec.title),
                sec.body
            );
        }
        s += "</body>\n</html>\n";
        s
    }
}

/// An HTML table; cells are escaped.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in headers {
        s += &format!("<th>{}</th>", esc(h));
    }
    s += "</tr></thead><tbody>";
    for r in rows {
        s += "<tr>";
        for c in r {
            s += &format!("<td>{}</td>", esc(c));
        }
        s += "</tr>";
    }
    s += "</tbody></table>";
    s
}

/// A paragraph of escaped text.
pub fn para(text: &str) -> String {
    format!("<p>{}</p>", esc(text))
}

/// A figure wrapping inline markup (e.g. SVG) with a caption.
pub fn figure(markup: &str, caption: &str) -> String {
    format!(
        "<figure>{markup}<figcaption>{}</figcaption></figure>",
        esc(caption)
    )
}

/// An inline PNG image (base64 data URI) with a caption.
pub fn png_figure(png: &[u8], caption: &str) -> String {
    figure(
        &format!(
            "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
            esc(caption),
            base64(png)
        ),
        caption,
    )
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (i, o) in cases {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn report_escapes_and_has_sections() {
        let mut r = Report::new("T<1>");
        r.section("Summary", table(&["a"], &[vec!["<b>".into()]]));
        let h = r.render();
        assert!(h.contains("<h2>Summary</h2>"));
        assert!(h.contains("&lt;b&gt;") && !h.contains("<b>"));
        assert!(h.starts_with("<!DOCTYPE html>"));
    }
}
