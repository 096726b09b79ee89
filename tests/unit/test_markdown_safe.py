"""Safe rendering (personal_gpt/markdown_safe.py): classic XSS payloads through
``render_html`` (checked by parsing the HTML it returns with html5lib, as a browser
would) and through ``for_streamlit`` (checked by rendering the Markdown it returns
with markdown-it in CommonMark mode, raw HTML on — stricter than Streamlit, which
shows raw HTML as text — and looking at every element), plus normal Markdown coming
through intact. The browser side is tests/e2e/test_xss_browser.py."""

from __future__ import annotations

import re

import html5lib
import pytest
from markdown_it import MarkdownIt

from personal_gpt.markdown_safe import ALLOWED_TAGS, for_streamlit, plain, render_html, unsafe_constructs, url_is_safe

PAYLOADS = [
    "<script>window.__xss=1</script>",
    "<SCRIPT SRC=https://evil.example/x.js></SCRIPT>",
    "<img src=x onerror=alert(1)>",
    '<img src="x" onerror="window.__xss=1">',
    "<svg onload=alert(1)>",
    "<svg><script>alert(1)</script></svg>",
    "<iframe src=javascript:alert(1)></iframe>",
    '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    "<style>body{background:url(javascript:alert(1))}</style>",
    '<div style="background:url(javascript:alert(1))">x</div>',
    '<a href="javascript:alert(1)">html link</a>',
    "<body onload=alert(1)>",
    '<input autofocus onfocus="alert(1)">',
    "<details open ontoggle=alert(1)>",
    "<img src=x onerror=alert(1)",  # unclosed
    "<scr<script>ipt>alert(1)</scr</script>ipt>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<!--<img src=x onerror=alert(1)>-->",
    "<object data=javascript:alert(1)>",
    "<form action=javascript:alert(1)><button>go</button></form>",
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click]( javascript:alert(1) )",
    "[click](<javascript:alert(1)>)",
    "[click](\njavascript:alert(1))",
    "[click](&#106;avascript:alert(1))",
    "[click](&#x6A;&#x61;vascript:alert(1))",
    "[click](javascript&colon;alert(1))",
    "[click](java&#09;script:alert(1))",
    "[click](<java\tscript:alert(1)>)",
    "[click](javascript\\:alert(1))",
    "[click](%6Aavascript:alert(1))",
    "[click](vbscript:msgbox(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[click](data:text/html,<script>alert(1)</script>)",
    '[click](javascript:alert(1) "title")',
    "[click](file:///etc/passwd)",
    "<javascript:alert(1)>",
    "<JAVASCRIPT:alert(1)>",
    "<vbscript:msgbox(1)>",
    "[x][r]\n\n[r]: javascript:alert(1)",
    "[r]\n\n[r]: <javascript:alert(1)>",
    "[x][r]\n\n[r]:\n  javascript:alert(1)",
    "> [x](\n> javascript:alert(1))",
    "- [x](javascript:alert(1))\n- ![y](javascript:alert(2))",
    "| a | b |\n|---|---|\n| [x](javascript:alert(1)) | ![i](https://t.example/p.png) |",
    "[[inner](javascript:alert(1))](https://example.com)",
    "[outer [inner](javascript:alert(1))](https://example.com)",
    "[a](https://example.com)[b](javascript:alert(1))",
    "\\[a](javascript:alert(1))",
    "\\\\[a](javascript:alert(1))",
    "\\<javascript:alert(1)>",
    "\\\\<javascript:alert(1)>",
    "![x](javascript:alert(1))",
    "![x](https://tracker.example/pixel.png)",
    "![x][img]\n\n[img]: https://tracker.example/pixel.png",
    "\\\\![x](https://tracker.example/pixel.png)",
    "![x](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
    "[![x](https://tracker.example/p.png)](javascript:alert(1))",
    "<div>\n```\n</div>\n\n[x](javascript:alert(1))\n```",
    "`code` [x](javascript:alert(1)) `more`",
    "``[x](javascript:alert(1))`",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "&#60;img src=x onerror=alert(1)&#62;",
    "[x](javascript:alert(1)",  # unterminated, as while streaming
    "$\\href{javascript:alert(1)}{maths link}$",
]

EVENT_ATTR = re.compile(r"^on", re.I)


def elements(fragment_html: str):
    doc = html5lib.parseFragment(fragment_html, treebuilder="etree", namespaceHTMLElements=False)
    return list(doc.iter())[1:]  # the fragment root itself is not an element of the text


def _scheme(url: str) -> str | None:
    cleaned = re.sub(r"[\x00-\x20]", "", url)
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):", cleaned)
    return m.group(1).lower() if m else None


def assert_inert_html(out: str, *, relative_ok: bool = False) -> None:
    for el in elements(out):
        tag = el.tag if isinstance(el.tag, str) else ""
        assert tag in ALLOWED_TAGS, f"tag {tag!r} in {out!r}"
        for name, value in el.attrib.items():
            assert not EVENT_ATTR.match(name), f"event handler {name} in {out!r}"
            if tag == "a":
                assert name in ("href", "title", "target", "rel"), f"attribute {name} in {out!r}"
                if name == "href":
                    scheme = _scheme(value)
                    assert scheme in ("http", "https", "mailto") or (relative_ok and scheme is None), out
            else:
                assert False, f"attribute {name} on {tag} in {out!r}"
    assert "<script" not in out.lower()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_render_html_is_inert(payload):
    out = render_html(payload)
    assert_inert_html(out)
    for el in elements(out):
        if el.tag == "a":
            assert el.attrib.get("rel") == "nofollow noopener noreferrer"
            assert el.attrib.get("target") == "_blank"


def commonmark_html(markdown: str) -> str:
    """The Markdown as a CommonMark renderer that keeps every link and raw HTML would
    render it (stricter than st.markdown, which shows raw HTML as text)."""
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    md.validateLink = lambda url: True
    return md.render(markdown)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_for_streamlit_leaves_no_unsafe_link_or_image(payload):
    out = for_streamlit(payload)
    assert unsafe_constructs(out) == []
    for el in elements(commonmark_html(out)):
        assert el.tag != "img", f"image left in {out!r}"
        if el.tag == "a":
            assert url_is_safe(el.attrib.get("href", "")), f"link {el.attrib} left in {out!r}"
            assert _scheme(el.attrib.get("href", "")) in (None, "http", "https", "mailto")


def test_for_streamlit_keeps_the_words_of_a_neutralised_link():
    assert for_streamlit("[click here](javascript:alert(1))") == "[click here]\\(javascript:alert(1))"
    assert for_streamlit("see ![the chart](https://x.example/c.png)") == "see \\![the chart](https://x.example/c.png)"
    assert for_streamlit("<javascript:alert(1)>") == "\\<javascript:alert(1)>"


NORMAL = [
    "Plain text with no markup at all.",
    "**bold**, *italic*, ~~gone~~ and `inline code`",
    "# Title\n\n## Sub\n\n- one\n- two\n\n1. first\n2. second",
    "> a quote\n\n---\n\nafter the rule",
    "| Plan | Price |\n|:-----|------:|\n| Basic | $5 |\n| Pro | $9 |",
    "Links: [Bloom](https://bloom.example/shop?x=1&y=2), <https://bloom.example>, [mail](mailto:hi@bloom.example), "
    "[section](#prices), [doc](/docs/guide.md) and [ref link][r].\n\n[r]: https://bloom.example/ref",
    "```python\nx = [a](b)  # looks like a link\nprint(\"<script>\")\n```",
    "~~~\n![not an image](javascript:in_code)\n~~~",
    "    indented code [x](javascript:1)\n\nback",
    "Maths: $E = mc^2$ and $$\\int_0^1 f(x)\\,dx = [F(x)](0)$$",
    "Escapes: \\*not italic\\* and 2 \\< 3 and a!",
    "Prices: 3 < 4 and 5 > 2, AT&T, 100%",
]


@pytest.mark.parametrize("text", NORMAL)
def test_for_streamlit_leaves_normal_markdown_alone(text):
    assert for_streamlit(text) == text


def test_render_html_renders_normal_markdown():
    out = render_html(NORMAL[1] + "\n\n" + NORMAL[2] + "\n\n" + NORMAL[3] + "\n\n" + NORMAL[4])
    for fragment in ("<strong>bold</strong>", "<em>italic</em>", "<code>inline code</code>", "<h1>Title</h1>",
                     "<h2>Sub</h2>", "<li>one</li>", "<ol>", "<blockquote>", "<hr>", "<table>", "<th>Plan</th>",
                     "<td>$5</td>"):
        assert fragment in out, fragment
    assert_inert_html(out)
    links = render_html(NORMAL[5])
    assert '<a href="https://bloom.example/shop?x=1&amp;y=2" target="_blank" rel="nofollow noopener noreferrer">Bloom</a>' \
        in links
    assert 'href="mailto:hi@bloom.example"' in links and 'href="https://bloom.example/ref"' in links
    assert 'href="#prices"' not in links and 'href="/docs/guide.md"' not in links  # only absolute safe URLs
    code = render_html(NORMAL[6])
    assert "<pre><code>" in code and "&lt;script&gt;" in code and "[a](b)" in code
    assert render_html("3 < 4 & AT&T") == "<p>3 &lt; 4 &amp; AT&amp;T</p>"


def test_render_html_turns_images_into_links():
    out = render_html("![the chart](https://x.example/c.png) ![bad](javascript:alert(1))")
    assert "<img" not in out
    assert '<a href="https://x.example/c.png" target="_blank" rel="nofollow noopener noreferrer">the chart</a>' in out
    assert "javascript" not in out.split("the chart")[1].split("bad")[0]


def test_raw_html_is_shown_as_text():
    out = render_html("<b>hi</b> <img src=x onerror=alert(1)>")
    assert out == "<p>&lt;b&gt;hi&lt;/b&gt; &lt;img src=x onerror=alert(1)&gt;</p>"


@pytest.mark.parametrize("url, safe", [
    ("https://example.com", True), ("HTTP://example.com", True), ("mailto:a@b.c", True), ("/relative", True),
    ("#anchor", True), ("page.html", True), ("javascript:alert(1)", False), (" JavaScript:x", False),
    ("java\nscript:x", False), ("java\x00script:x", False), ("&#106;avascript:x", False), ("data:text/html,x", False),
    ("vbscript:x", False), ("<javascript:x>", False), ("javascript\\:x", False), ("tel:123", False),
])
def test_url_is_safe(url, safe):
    assert url_is_safe(url) is safe


def test_plain_shows_text_literally():
    nasty = "Bob's [GPT](javascript:alert(1)) ![p](https://t.example/p.png) :red[x] $y$ <b>*z*</b>\n# h"
    out = plain(nasty)
    assert "\n" not in out
    rendered = commonmark_html(out)
    assert "<a" not in rendered and "<img" not in rendered and "<em>" not in rendered and "<h1>" not in rendered
    text = "".join(elements(rendered)[0].itertext())
    assert text == " ".join(nasty.split())
    assert plain("Bloom helper") == "Bloom helper"
