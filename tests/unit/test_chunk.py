"""Chunking keeps the document's structure and fits the embedder: pages are
never mixed, titles open chunks and name their section, tables stay whole (or
split by rows), long text is split on sentences with overlap, and every chunk
fits the real tokenizer's budget."""

from __future__ import annotations

import pytest

from personal_gpt.knowledge.chunk import chunk_elements, estimate_tokens, split_sentences
from personal_gpt.knowledge.embed import MAX_SEQ_LENGTH, default_embedder
from personal_gpt.knowledge.types import Chunk, Element


@pytest.fixture(scope="module")
def count():
    return default_embedder().count_tokens


def sentences(n: int, topic: str = "returns") -> str:
    return " ".join(
        f"Sentence {i} explains one detail of our {topic} policy in about fifteen plain words for readers."
        for i in range(n)
    )


def table(rows: int) -> str:
    return "Product | Price | Stock\n" + "\n".join(f"Kettle model {i} | £{i}.99 | {i * 3} units" for i in range(rows))


def check_invariants(chunks: list[Chunk], count, max_tokens: int) -> None:
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.text.strip() == chunk.text and chunk.text
        assert count(chunk.text) <= max_tokens, chunk.text


def test_pages_are_never_mixed(count):
    elements = [
        Element("Page one intro.", "NarrativeText", page=1),
        Element("Page one more.", "NarrativeText", page=1),
        Element("Page two only.", "NarrativeText", page=2),
        Element("Page three first.", "NarrativeText", page=3),
        Element("Page three second.", "ListItem", page=3),
    ]
    chunks = chunk_elements(elements, count_tokens=count)
    assert [(c.page, c.text) for c in chunks] == [
        (1, "Page one intro.\nPage one more."),
        (2, "Page two only."),
        (3, "Page three first.\nPage three second."),
    ]


def test_titles_start_chunks_and_become_the_section(count):
    elements = [
        Element("Opening words before any title.", "NarrativeText", page=1),
        Element("Shipping", "Title", page=1),
        Element("We ship worldwide.", "NarrativeText", page=1),
        Element("Orders over £50 ship free.", "ListItem", page=1),
        Element("Returns", "Title", page=1),
        Element("Send items back within 30 days.", "NarrativeText", page=1),
        Element("Still about returns on the next page.", "NarrativeText", page=2),
    ]
    chunks = chunk_elements(elements, count_tokens=count)
    assert [(c.section, c.page, c.text) for c in chunks] == [
        (None, 1, "Opening words before any title."),
        ("Shipping", 1, "Shipping\nWe ship worldwide.\nOrders over £50 ship free."),
        ("Returns", 1, "Returns\nSend items back within 30 days."),
        ("Returns", 2, "Still about returns on the next page."),
    ]


def test_consecutive_titles_share_one_chunk_and_the_last_names_it(count):
    elements = [
        Element("Handbook", "Title", page=1),
        Element("Chapter 1: Delivery", "Title", page=1),
        Element("Parcels leave our warehouse daily.", "NarrativeText", page=1),
    ]
    [chunk] = chunk_elements(elements, count_tokens=count)
    assert chunk.section == "Chapter 1: Delivery"
    assert chunk.text == "Handbook\nChapter 1: Delivery\nParcels leave our warehouse daily."


def test_parser_sections_are_kept_without_titles(count):
    elements = [
        Element("First paragraph.", "NarrativeText", page=1, section="Intro"),
        Element("Second paragraph.", "NarrativeText", page=1, section="Intro"),
        Element("Third paragraph.", "NarrativeText", page=1, section="Prices"),
    ]
    chunks = chunk_elements(elements, count_tokens=count)
    assert [(c.section, c.text) for c in chunks] == [
        ("Intro", "First paragraph.\nSecond paragraph."),
        ("Prices", "Third paragraph."),
    ]


def test_a_table_that_fits_stays_whole(count):
    small = table(8)
    elements = [
        Element("Prices", "Title", page=1),
        Element(sentences(9), "NarrativeText", page=1),  # fills most of a chunk
        Element(small, "Table", page=1),
    ]
    chunks = chunk_elements(elements, count_tokens=count)
    check_invariants(chunks, count, 200)
    holding = [c for c in chunks if "Kettle model" in c.text]
    assert len(holding) == 1
    assert small in holding[0].text
    assert holding[0].section == "Prices"


def test_a_big_table_is_split_by_whole_rows_repeating_its_header(count):
    big = table(60)
    rows = big.split("\n")
    chunks = chunk_elements([Element(big, "Table", page=4)], count_tokens=count)
    check_invariants(chunks, count, 200)
    assert len(chunks) > 1
    seen = []
    for chunk in chunks:
        lines = chunk.text.split("\n")
        assert lines[0] == rows[0]  # every piece starts with the header row
        assert all(line in rows for line in lines)  # rows are never cut
        seen.extend(line for line in lines[1:])
        assert chunk.page == 4
    assert seen == rows[1:]  # every row once, in order


def test_long_text_is_split_on_sentences_with_overlap(count):
    text = sentences(40)
    chunks = chunk_elements([Element(text, "NarrativeText", page=1)], count_tokens=count, max_tokens=120, overlap_tokens=30)
    check_invariants(chunks, count, 120)
    assert len(chunks) >= 4
    wanted = split_sentences(text)
    for chunk in chunks:  # every chunk is whole sentences
        assert all(s in wanted for s in split_sentences(chunk.text))
    for before, after in zip(chunks, chunks[1:]):
        last_sentence = split_sentences(before.text)[-1]
        assert after.text.startswith(last_sentence)  # the overlap: the previous sentence is repeated
        assert count(last_sentence) <= 30
    covered = []
    for chunk in chunks:
        for s in split_sentences(chunk.text):
            if not covered or s != covered[-1]:
                covered.append(s)
    assert covered == wanted  # nothing lost, order kept


def test_a_title_leads_the_first_piece_of_long_text(count):
    chunks = chunk_elements(
        [Element("Refunds", "Title", page=1), Element(sentences(40), "NarrativeText", page=1)], count_tokens=count
    )
    check_invariants(chunks, count, 200)
    assert chunks[0].text.startswith("Refunds\nSentence 0 ")
    assert all(c.section == "Refunds" for c in chunks)


def test_tiny_neighbours_are_merged_up_to_the_size(count):
    items = [Element(f"Item number {i} of the packing list.", "ListItem", page=1) for i in range(60)]
    chunks = chunk_elements(items, count_tokens=count, max_tokens=100, overlap_tokens=10)
    check_invariants(chunks, count, 100)
    assert 3 <= len(chunks) <= 8
    assert "\n".join(c.text for c in chunks) == "\n".join(e.text for e in items)  # no overlap between whole elements
    assert all(count(c.text) > 60 for c in chunks[:-1])  # packed, not one per item


def test_every_chunk_fits_the_real_tokenizer_on_a_mixed_document(count):
    elements = []
    for page in range(1, 6):
        elements += [
            Element(f"Part {page}", "Title", page=page),
            Element("Header text repeated on every page", "Header", page=page),
            Element(sentences(30, topic=f"part {page}"), "NarrativeText", page=page),
            Element("A single run-on line " + "without any full stop " * 80, "NarrativeText", page=page),
            Element("x" * 3000, "NarrativeText", page=page),  # one giant token-like string
            Element(table(40), "Table", page=page),
            Element(str(page), "PageNumber", page=page),
            Element("   ", "NarrativeText", page=page),
        ]
    chunks = chunk_elements(elements, count_tokens=count)
    check_invariants(chunks, count, 200)
    assert all(c.page is not None for c in chunks)
    assert not any("Header text repeated" in c.text for c in chunks)  # page furniture dropped
    assert chunks == chunk_elements(elements, count_tokens=count)  # deterministic
    # without a tokenizer the word estimate is conservative: chunks still fit the model
    estimated = chunk_elements(elements)
    assert all(count(c.text) + 2 <= MAX_SEQ_LENGTH for c in estimated)
    assert all(estimate_tokens(c.text) <= 200 for c in estimated)


def test_nothing_in_nothing_out_and_bad_sizes_are_refused(count):
    assert chunk_elements([]) == []
    assert chunk_elements([Element("", "NarrativeText"), Element("  \n ", "Title")]) == []
    with pytest.raises(ValueError):
        chunk_elements([Element("x", "NarrativeText")], max_tokens=4)
    with pytest.raises(ValueError):
        chunk_elements([Element("x", "NarrativeText")], max_tokens=100, overlap_tokens=80)


def test_a_page_whose_only_line_the_parser_calls_a_header_is_kept():
    """unstructured labels a short page's only line 'Header'; dropping it lost page 3 of a real PDF."""
    elements = [
        Element("Bloom & Branch catalogue.", "Header", page=1),
        Element("Prices. The Sunrise bouquet costs 35 pounds.", "Header", page=3),
        Element("Confidential", "Footer", page=1),
        Element("Confidential", "Footer", page=3),
    ]
    chunks = chunk_elements(elements)
    assert [(c.page, c.text) for c in chunks] == [
        (1, "Bloom & Branch catalogue."), (3, "Prices. The Sunrise bouquet costs 35 pounds.")
    ]
