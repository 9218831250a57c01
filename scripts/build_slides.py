"""`make slides`: turn docs/slides/*.md into self-contained HTML decks in docs/slides/build/.

    python scripts/build_slides.py                        # every docs/slides/*.md
    python scripts/build_slides.py docs/slides/part1.md --out /tmp/decks

A deck is Markdown with slides separated by a line holding only `---`. Inside a slide:

    <!-- class: title -->       layout classes for the slide: title, section, two (two columns), figure, small
    <!-- notes: ... -->         speaker notes: hidden, shown under the slide with the N key
    ![caption](../img/x.png)    images are read from disk and embedded as data: URIs
    <!-- split -->              in a `two` slide, where the second column starts
    1.388<!-- = FILE: PATH -->  a number's source (checked by tests/test_slides.py); dropped from the HTML

The output has no external reference: CSS, the navigation script and every image are inline, code is coloured
by Pygments at build time, so a deck opens from a USB stick on a machine without network. Keys: → / Space /
PageDown next, ← / PageUp previous, Home / End, F full screen, N notes, P print view (one slide per page, for
"Save as PDF"). Clicks on the right or left third and swipes work too; the address keeps the slide (#5).
"""

from __future__ import annotations

import argparse
import base64
import html
import mimetypes
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT / "docs" / "slides"
SEPARATOR = re.compile(r"^---[ \t]*$", re.M)
DIRECTIVE = re.compile(r"<!--\s*(class|notes):(.*?)-->", re.S)
SPLIT = "<!-- split -->"
CLAIM_MARKER = re.compile(r"<!--\s*=.*?-->", re.S)  # where a number came from: for the tests, not the audience
IMG_SRC = re.compile(r'(<img[^>]*?\ssrc=")([^"]+)(")')
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//|url\(\s*["']?(?:https?:)?//""", re.I)

CSS = """
:root { --w: 1280px; --h: 720px; --ink: #1d2330; --muted: #5b6475; --accent: #2f6fdf; --bg: #ffffff;
        --code-bg: #f5f7fa; }
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; background: #20242c; overflow: hidden;
             font-family: "Inter", "Segoe UI", system-ui, -apple-system, "DejaVu Sans", sans-serif; }
.deck { position: absolute; left: 50%; top: 50%; width: var(--w); height: var(--h); transform-origin: center; }
.slide { position: absolute; inset: 0; background: var(--bg); color: var(--ink); padding: 56px 72px 48px;
         display: none; flex-direction: column; overflow: hidden; font-size: 26px; line-height: 1.4; }
.slide.active { display: flex; }
.slide h1 { font-size: 46px; margin: 0 0 20px; color: var(--ink); letter-spacing: -0.5px; }
.slide h2 { font-size: 38px; margin: 0 0 22px; color: var(--ink); letter-spacing: -0.3px;
            border-bottom: 4px solid var(--accent); padding-bottom: 8px; align-self: flex-start; }
.slide h3 { font-size: 28px; margin: 8px 0; color: var(--accent); }
.slide p { margin: 8px 0; }
.slide ul, .slide ol { margin: 6px 0; padding-left: 1.2em; }
.slide li { margin: 6px 0; }
.slide strong { color: #0d3d91; }
.slide a { color: var(--accent); }
.slide code { font-family: "JetBrains Mono", "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.86em;
              background: var(--code-bg); padding: 1px 5px; border-radius: 4px; }
.slide pre { background: var(--code-bg); border: 1px solid #e3e7ee; border-radius: 8px; padding: 14px 18px;
             margin: 10px 0; font-size: 18px; line-height: 1.35; overflow: hidden; white-space: pre-wrap;
             overflow-wrap: anywhere; }
.slide pre code { background: none; padding: 0; font-size: inherit; }
.slide table { border-collapse: collapse; font-size: 21px; margin: 10px 0; }
.slide th, .slide td { border-bottom: 1px solid #e3e7ee; padding: 6px 14px; text-align: left; }
.slide th { color: var(--muted); font-weight: 600; }
.slide img { max-width: 100%; max-height: 470px; object-fit: contain; display: block; margin: 8px auto; }
.slide blockquote { margin: 10px 0; padding: 4px 20px; border-left: 5px solid var(--accent); color: var(--muted); }
.slide .footer { position: absolute; bottom: 16px; left: 72px; right: 72px; display: flex;
                 justify-content: space-between; font-size: 15px; color: #9aa3b2; }
.slide.title { justify-content: center; background: linear-gradient(135deg, #f3f7ff 0%, #ffffff 60%); }
.slide.title h1 { font-size: 62px; }
.slide.title p { color: var(--muted); font-size: 28px; }
.slide.section { justify-content: center; background: #1d2330; color: #fff; }
.slide.section h1, .slide.section h2 { color: #fff; border-color: #6fa0ff; }
.slide.figure img { max-height: 560px; }
.slide.small { font-size: 21px; }
.slide.small pre { font-size: 15px; }
.slide.small img { max-height: 400px; }
.slide.two .cols { display: grid; grid-template-columns: 1fr 1fr; gap: 36px; align-items: start; flex: 1;
                   min-height: 0; }
.slide.two .cols > div { min-width: 0; }
.slide.two .cols img { max-height: 440px; }
.slide.two .cols pre { font-size: 16px; }
.notes { display: none; }
body.show-notes .slide.active .notes { display: block; position: absolute; left: 0; right: 0; bottom: 0;
  background: #fff8d6; color: #3b3000; font-size: 17px; padding: 10px 72px; border-top: 1px solid #e6d98a; }
.progress { position: fixed; left: 0; bottom: 0; height: 4px; background: var(--accent); transition: width .2s; }
@media print {
  html, body { overflow: visible; background: #fff; height: auto; }
  .deck { position: static; transform: none !important; width: auto; height: auto; }
  .slide { position: relative; display: flex !important; width: var(--w); height: var(--h);
           page-break-after: always; break-after: page; }
  .progress, .notes { display: none !important; }
  @page { size: 1280px 720px; margin: 0; }
}
"""

JS = """
(function () {
  const slides = Array.from(document.querySelectorAll('.slide'));
  const deck = document.querySelector('.deck');
  const bar = document.querySelector('.progress');
  let i = 0;
  function fit() {
    const s = Math.min(window.innerWidth / 1280, window.innerHeight / 720);
    deck.style.transform = 'translate(-50%, -50%) scale(' + s + ')';
  }
  function go(n) {
    i = Math.max(0, Math.min(slides.length - 1, n));
    slides.forEach((el, k) => el.classList.toggle('active', k === i));
    bar.style.width = (100 * (i + 1) / slides.length) + '%';
    if (location.hash !== '#' + (i + 1)) history.replaceState(null, '', '#' + (i + 1));
  }
  function fromHash() { const n = parseInt(location.hash.slice(1), 10); go(isNaN(n) ? 0 : n - 1); }
  document.addEventListener('keydown', (e) => {
    if (e.metaKey || e.ctrlKey || e.altKey) return;
    const k = e.key;
    if (k === 'ArrowRight' || k === 'ArrowDown' || k === ' ' || k === 'PageDown' || k === 'Enter') go(i + 1);
    else if (k === 'ArrowLeft' || k === 'ArrowUp' || k === 'PageUp' || k === 'Backspace') go(i - 1);
    else if (k === 'Home') go(0);
    else if (k === 'End') go(slides.length - 1);
    else if (k === 'n' || k === 'N') document.body.classList.toggle('show-notes');
    else if (k === 'p' || k === 'P') window.print();
    else if (k === 'f' || k === 'F') {
      if (document.fullscreenElement) document.exitFullscreen(); else document.documentElement.requestFullscreen();
    } else return;
    e.preventDefault();
  });
  document.addEventListener('click', (e) => {
    if (e.target.closest('a')) return;
    if (e.clientX > window.innerWidth * 2 / 3) go(i + 1);
    else if (e.clientX < window.innerWidth / 3) go(i - 1);
  });
  let x0 = null;
  document.addEventListener('touchstart', (e) => { x0 = e.touches[0].clientX; }, {passive: true});
  document.addEventListener('touchend', (e) => {
    if (x0 === null) return;
    const dx = e.changedTouches[0].clientX - x0;
    if (Math.abs(dx) > 40) go(dx < 0 ? i + 1 : i - 1);
    x0 = null;
  });
  window.addEventListener('resize', fit);
  window.addEventListener('hashchange', fromHash);
  fit();
  fromHash();
})();
"""


class SlideError(Exception):
    """A deck that cannot be built offline (a missing image, an external URL)."""


def markdown_renderer():
    from markdown_it import MarkdownIt

    def highlight(code: str, lang: str, attrs: str) -> str:
        try:
            from pygments import highlight as pyg
            from pygments.formatters import HtmlFormatter
            from pygments.lexers import get_lexer_by_name
            from pygments.util import ClassNotFound
        except ImportError:
            return ""  # markdown-it escapes the code itself
        try:
            lexer = get_lexer_by_name(lang or "text")
        except ClassNotFound:
            return ""
        # inline styles: the colours travel with the HTML, no stylesheet to ship
        return pyg(code, lexer, HtmlFormatter(nowrap=True, noclasses=True, style="friendly"))

    return MarkdownIt("commonmark", {"html": True, "highlight": highlight}).enable("table")


def embed_images(body: str, base: Path) -> str:
    def repl(m: re.Match) -> str:
        src = html.unescape(m.group(2))
        if src.startswith("data:"):
            return m.group(0)
        if re.match(r"^(?:[a-z]+:)?//", src, re.I):
            raise SlideError(f"image {src} is not a local file: decks must open offline; save it under docs/img/")
        path = (base / src).resolve()
        if not path.is_file():
            raise SlideError(f"image {src} not found (looked for {path})")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"{m.group(1)}data:{mime};base64,{data}{m.group(3)}"

    return IMG_SRC.sub(repl, body)


def render_slide(source: str, md, base: Path, number: int, total: int, footer: str) -> str:
    classes, notes = [], []
    for kind, value in DIRECTIVE.findall(source):
        (classes.extend(value.split()) if kind == "class" else notes.append(value.strip()))
    source = CLAIM_MARKER.sub("", DIRECTIVE.sub("", source))
    if "two" in classes and SPLIT in source:
        left, right = source.split(SPLIT, 1)
        heading, left = _leading_heading(left)
        body = (md.render(heading) + '<div class="cols"><div>' + md.render(left) + "</div><div>"
                + md.render(right) + "</div></div>")
    else:
        body = md.render(source)
    body = embed_images(body, base)
    notes_html = f'<div class="notes">{html.escape(" ".join(notes))}</div>' if notes else ""
    foot = f'<div class="footer"><span>{html.escape(footer)}</span><span>{number} / {total}</span></div>'
    return f'<section class="slide {" ".join(classes)}">{body}{notes_html}{foot}</section>'


def _leading_heading(text: str) -> tuple[str, str]:
    m = re.match(r"\s*(#{1,3} [^\n]*)\n", text)
    return (m.group(1), text[m.end():]) if m else ("", text)


def build(src: Path, out_dir: Path) -> Path:
    text = src.read_text(encoding="utf-8")
    parts = [p.strip("\n") for p in SEPARATOR.split(text) if p.strip()]
    if not parts:
        raise SlideError(f"{src} has no slides")
    title_match = re.search(r"^# (.+)$", parts[0], re.M)
    title = title_match.group(1).strip() if title_match else src.stem
    md = markdown_renderer()
    slides = [render_slide(p, md, src.parent, i + 1, len(parts), title) for i, p in enumerate(parts)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>"
            f'<div class="deck">{"".join(slides)}</div><div class="progress"></div>'
            f"<script>{JS}</script></body></html>\n")
    external = EXTERNAL.search(re.sub(r"<a\s[^>]*>", "<a>", page))  # links may point out; resources may not
    if external:
        raise SlideError(f"{src} would load something from the network: {external.group(0)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{src.stem}.html"
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decks", nargs="*", help="Markdown decks (default: docs/slides/*.md)")
    parser.add_argument("--out", default=str(SLIDES / "build"), help="output directory")
    args = parser.parse_args(argv)
    decks = [Path(d) for d in args.decks] or sorted(SLIDES.glob("*.md"))
    if not decks:
        print(f"build_slides: no decks in {SLIDES}", file=sys.stderr)
        return 2
    try:
        for deck in decks:
            out = build(deck, Path(args.out))
            print(f"{out} ({out.stat().st_size / 1e3:.0f} kB, {out.read_text().count('<section')} slides)")
    except (SlideError, OSError) as e:
        print(f"build_slides: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"build_slides: error: {e.name} is missing; pip install markdown-it-py pygments "
              "(both come with nanophi[notebook])", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
