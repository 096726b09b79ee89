"""Model output, visitor messages and knowledge text as inert Markdown: ``render_html``
(Markdown -> sanitized HTML for our own pages: the embed widget) and ``for_streamlit``
(Markdown source that ``st.markdown`` may render: unsafe link targets and images made
plain text). Whatever the model or a knowledge file says, no script, no event handler,
no ``javascript:``/``data:`` link and no remote image come out. No streamlit import here.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache

SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
ALLOWED_TAGS = frozenset({
    "p", "br", "strong", "em", "code", "pre", "ul", "ol", "li", "blockquote", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "hr",
})
LINK_REL = "nofollow noopener noreferrer"

# What a browser ignores in a URL before reading its scheme: C0 controls and space at the
# ends, tab and line breaks anywhere (WHATWG URL parser); we drop every control character.
_CONTROLS = re.compile(r"[\x00-\x20\x7f-\x9f]+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_BACKSLASH_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def url_is_safe(url: str) -> bool:
    """True for http, https and mailto URLs and for URLs without a scheme (relative);
    False for any other scheme however it is spelt (case, entities, controls, escapes)."""
    cleaned = _CONTROLS.sub("", html.unescape(_BACKSLASH_ESCAPE.sub(r"\1", url or "")))
    if cleaned.startswith("<"):  # <destination> form
        cleaned = cleaned[1:]
    match = _SCHEME.match(cleaned)
    return match is None or match.group(1).lower() in SAFE_SCHEMES


def _absolute_safe(url: str) -> bool:
    """Stricter, for ``render_html``: only http, https and mailto (no relative URLs)."""
    cleaned = _CONTROLS.sub("", url or "")
    match = _SCHEME.match(cleaned)
    return match is not None and match.group(1).lower() in SAFE_SCHEMES


# --- parsing (markdown-it-py, CommonMark + tables + strikethrough, raw HTML off) ------


@lru_cache(maxsize=2)
def _parser(permissive: bool):
    """``permissive``: every link is kept and not normalised, and raw HTML is parsed (so
    blocks split as Streamlit's remark splits them, which shows that HTML as text) — to
    inspect what a renderer would see. Otherwise raw HTML is text and markdown-it's own
    link validation stays on as a first net."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": permissive, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    if permissive:
        md.validateLink = lambda url: True
        md.normalizeLink = lambda url: url
        md.normalizeLinkText = lambda url: url
    else:
        md.add_render_rule("image", _image_as_link)
    return md


def _image_as_link(self, tokens, idx, options, env) -> str:
    """An image becomes a link with its alt text: no remote image loads by itself
    (a tracking pixel), and the sanitizer decides whether the link stays."""
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    src = token.attrGet("src") or ""
    return f'<a href="{html.escape(str(src), quote=True)}">{html.escape(alt)}</a>'


@lru_cache(maxsize=1)
def _cleaner():
    import nh3

    return nh3.Cleaner(
        tags=set(ALLOWED_TAGS),
        clean_content_tags={"script", "style"},
        attributes={"a": {"href", "title"}},
        url_schemes=set(SAFE_SCHEMES),
        url_relative="deny",
        link_rel=LINK_REL,
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )


def render_html(text: str) -> str:
    """Markdown -> HTML fit to put in a page with ``innerHTML``: raw HTML in the text is
    shown as text, images become links, and the result keeps only the allowed tags,
    ``href``/``title`` on links (http, https, mailto), each link opening in a new tab
    with ``rel="nofollow noopener noreferrer"``."""
    rendered = _parser(False).render(str(text or ""))
    return _cleaner().clean(rendered).strip()


# --- Markdown source for st.markdown ----------------------------------------------------

_LINK_DEST = re.compile(r"\]\([ \t]*(?:\r?\n[ \t]*)?(<[^>\n]*>?|[^\s)]*)")
_REF_DEF = re.compile(r"^([ \t>]*(?:(?:[-*+]|\d{1,9}[.)])[ \t]+)?)\[((?:[^\[\]\\\n]|\\.)+)\]:[ \t]*(\S*)", re.M)
_BACKTICKS = re.compile(r"`+")
_UNESCAPED = r"(?<!\\)((?:\\\\)*)"  # preceded by an even number of backslashes (none escapes it)
_IMAGE = re.compile(_UNESCAPED + r"!\[")
_AUTOLINK = re.compile(_UNESCAPED + r"<([A-Za-z][A-Za-z0-9+.\-]{1,31}):[^\s<>]*>")


def _code_lines(text: str) -> set[int]:
    """Line numbers inside fenced or indented code blocks (anywhere: lists, quotes)."""
    lines: set[int] = set()
    for token in _parser(True).parse(text):
        if token.type in ("fence", "code_block") and token.map:
            lines.update(range(token.map[0], token.map[1]))
    return lines


def _split_code_spans(segment: str) -> list[tuple[bool, str]]:
    """[(is_code, text)] by CommonMark's backtick rule: a run of n backticks opens a code
    span closed by the next run of exactly n. A mistake here only means a missed rewrite,
    which the final check catches."""
    parts: list[tuple[bool, str]] = []
    pos = start = 0
    while True:
        opening = _BACKTICKS.search(segment, pos)
        if opening is None:
            break
        n = len(opening.group())
        closing = opening.end()
        while True:
            closing_match = _BACKTICKS.search(segment, closing)
            if closing_match is None or len(closing_match.group()) == n:
                break
            closing = closing_match.end()
        if closing_match is None:
            pos = opening.end()
            continue
        parts.append((False, segment[start:opening.start()]))
        parts.append((True, segment[opening.start():closing_match.end()]))
        pos = start = closing_match.end()
    parts.append((False, segment[start:]))
    return parts


def _rewrite_text(text: str) -> str:
    """Outside code: images -> links (``\\![``), unsafe inline-link targets -> literal text
    (``]\\(``), unsafe autolinks -> literal text (``\\<``)."""
    text = _IMAGE.sub(lambda m: m.group(1) + "\\![", text)

    def link(m: re.Match) -> str:
        return m.group(0) if url_is_safe(m.group(1)) else "]\\(" + m.group(0)[2:]

    def autolink(m: re.Match) -> str:
        if m.group(2).lower() in SAFE_SCHEMES:
            return m.group(0)
        return m.group(1) + "\\" + m.group(0)[len(m.group(1)):]

    return _AUTOLINK.sub(autolink, _LINK_DEST.sub(link, text))


def _outside_code(text: str, rewrite) -> str:
    """Apply ``rewrite`` to the text outside code blocks and code spans."""
    code = _code_lines(text)
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    prose: list[str] = []

    def flush():
        if prose:
            segment = "".join(prose)
            out.append("".join(part if is_code else rewrite(part) for is_code, part in _split_code_spans(segment)))
            prose.clear()

    for number, line in enumerate(lines):
        if number in code:
            flush()
            out.append(line)
        else:
            prose.append(line)
    flush()
    return "".join(out)


def _neutralise_definitions(text: str) -> str:
    """``[ref]: javascript:…`` is no longer a link reference definition (``\\[ref]:``)."""
    code = _code_lines(text)

    def definition(m: re.Match) -> str:
        line = text.count("\n", 0, m.start())
        dest = m.group(3)
        if line in code:
            return m.group(0)
        if not dest:  # the destination may be on the next line
            rest = text[m.end():].lstrip(" \t\r\n>")
            dest = rest.split(None, 1)[0] if rest.strip() else ""
        if url_is_safe(dest):
            return m.group(0)
        return m.group(1) + "\\" + m.group(0)[len(m.group(1)):]

    return _REF_DEF.sub(definition, text)


def _escape_all_links(text: str) -> str:
    """The heavy fallback: every backslash, ``[``, ``]``, ``<`` and ``!`` outside code blocks
    escaped, so no link, image or autolink can form at all."""
    code = _code_lines(text)
    lines = text.splitlines(keepends=True)
    return "".join(
        line if number in code else re.sub(r"([\\\[\]<!])", r"\\\1", line) for number, line in enumerate(lines)
    )


def unsafe_constructs(text: str) -> list[str]:
    """What in ``text`` a Markdown renderer would turn into an image or a link with an
    unsafe target (as markdown-it, CommonMark, parses it); empty when there is none."""
    found: list[str] = []
    for token in _parser(True).parse(text):
        for child in token.children or []:
            if child.type == "image":
                found.append(f"image {child.attrGet('src')!r}")
            elif child.type == "link_open" and not url_is_safe(str(child.attrGet("href") or "")):
                found.append(f"link {child.attrGet('href')!r}")
    return found


def _fenced(text: str) -> str:
    longest = max((len(m.group()) for m in _BACKTICKS.finditer(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def for_streamlit(text: str) -> str:
    """Markdown for ``st.markdown`` (raw HTML stays off: Streamlit then shows it as text):
    links whose target is not http, https, mailto or relative become plain text, images
    become links (no remote image loads by itself). Normal Markdown, code and maths are
    left as they are. Checked by parsing the result; text that still hides a link after
    the rewrite has every bracket escaped, and as a last resort is shown as a code block."""
    text = str(text or "")
    if not any(c in text for c in "[<!"):
        return text
    safe = _outside_code(_neutralise_definitions(text), _rewrite_text)
    if not unsafe_constructs(safe):
        return safe
    safe = _escape_all_links(text)
    if not unsafe_constructs(safe):
        return safe
    return _fenced(text)  # pragma: no cover - no known input gets here


_INLINE_MARKUP = re.compile(r"([\\`*_{}\[\]<>!|~:$])")  # links, images, emphasis, code, maths, :colour[]


def plain(text: str) -> str:
    """``text`` on one line, shown literally by anything that renders Markdown (``st.markdown``,
    widget labels, captions, titles): runs of whitespace become one space, and the characters
    that could start Markdown are backslash-escaped (CommonMark allows escaping any ASCII
    punctuation), so names, titles and file names never form a link, an image, maths,
    emphasis, a heading or Streamlit's ``:colour[…]``. Ordinary text is left as it is."""
    line = _INLINE_MARKUP.sub(r"\\\1", " ".join(str(text or "").split()))
    digits = re.match(r"^\d{1,9}(?=[.)])", line)
    if digits:
        return line[:digits.end()] + "\\" + line[digits.end():]
    return re.sub(r"^([#>+\-=])", r"\\\1", line)
