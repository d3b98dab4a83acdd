"""Config validation messages and history-text construction."""

import pytest

from raysparse.config import ConfigError, config_from_dict, describe_config, load_config
from raysparse.data.text import ItemText, render_item_texts


def test_defaults_validate_and_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  fusion_dim: 32\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["model.dmf_user_layers=[64, 8]", "train.epochs=2", "ray.use_gpu=false"])
    assert cfg.model.fusion_dim == 32 and cfg.train.lr == 0.01
    assert cfg.model.dmf_user_layers == [64, 8] and cfg.train.epochs == 2 and cfg.ray.use_gpu is False
    assert cfg.replace(**{"model.fusion_dim": 8}).model.fusion_dim == 8


@pytest.mark.parametrize("raw, message", [
    ({"model": {"fusion_dimm": 3}}, r"Unknown config key 'model.fusion_dimm'\. Did you mean fusion_dim"),
    ({"bogus": 1}, r"Unknown config key 'bogus'"),
    ({"train": {"epochs": "many"}}, r"train.epochs='many' has the wrong type: expected int"),
    ({"model": {"variant": "bert"}}, r"model.variant='bert' is not allowed; choose one of 'fused', 'dmf', 'text'"),
    ({"data": {"cohort_fraction": 1.5}}, r"data.cohort_fraction=1.5 must be in \[0, 1\]"),
    ({"data": {"cohort_ks": [0, 2]}}, r"data.cohort_ks=\[0, 2\] must be a non-empty list of integers >= 1"),
    ({"ray": {"precision": "bf16"}}, r"ray.precision='bf16' needs ray.use_gpu=true"),
    ({"ray": {"zero_stage": 4}}, r"ray.zero_stage=4 is not allowed"),
    ({"model": "x"}, r"Config section 'model' must be a mapping"),
])
def test_bad_config_is_one_clear_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_set_syntax_and_missing_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'model.fusion_dim' must look like SECTION.KEY=VALUE"):
        load_config(None, ["model.fusion_dim"])
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_help_documents_every_key():
    text = describe_config()
    for key in ("data.cohort_fraction", "model.fusion_dim", "train.negatives_per_positive", "ray.zero_stage"):
        assert key in text


def test_template_renders_missing_fields_as_empty():
    import pandas as pd

    items = pd.DataFrame({"title": ["Heat", "Up"], "genres": ["Crime, Drama", None]})
    assert render_item_texts(items, "{title}. {genres}. {tags}") == ["Heat. Crime, Drama", "Up"]


def test_user_text_is_newest_first_truncated_and_closed_with_sep():
    text = ItemText([[10, 11], [20], [30, 31, 32]], cls_id=1, sep_id=2, pad_id=0)
    assert text.user_tokens([2, 0, 1], max_length=100) == [1, 30, 31, 32, 2, 10, 11, 2, 20, 2]
    assert text.user_tokens([2, 0, 1], max_length=6) == [1, 30, 31, 32, 2, 10, 2][:6] or \
        text.user_tokens([2, 0, 1], max_length=6)[-1] == 2
    short = text.user_tokens([2, 0, 1], max_length=6)
    assert len(short) <= 6 and short[0] == 1 and short[-1] == 2 and short[1:4] == [30, 31, 32]
    batch = text.batch([[0], [2, 1]], max_length=10)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 2, 0, 0, 0], [1, 30, 31, 32, 2, 20, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
