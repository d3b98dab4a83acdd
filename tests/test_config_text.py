"""Config validation messages and history-text construction."""

import pytest
import torch

from raysparse.config import ConfigError, config_from_dict, describe_config, load_config
from raysparse.data.text import ItemText, render_catalogue_texts, render_item_texts


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
    import dataclasses

    from raysparse.config import SECTIONS, Config

    text = describe_config()
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    keys += [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert len(keys) > 50
    for key in keys:
        assert f"  {key} = " in text, key


def test_string_options_take_the_set_text_as_written():
    # YAML reads "{title}" as the mapping {"title": None}; a string option keeps the text, other types still parse.
    cfg = load_config(None, ["data.text_template={title}", "model.dmf_user_layers=[64, 8]",
                             "train.lr=1e-3"])
    assert cfg.data.text_template == "{title}"
    assert cfg.model.dmf_user_layers == [64, 8] and cfg.train.lr == 0.001


def test_template_renders_missing_fields_as_empty():
    import pandas as pd

    items = pd.DataFrame({"title": ["Heat", "Up"], "genres": ["Crime, Drama", None]})
    assert render_item_texts(items, "{title}. {genres}. {tags}") == ["Heat. Crime, Drama", "Up"]


def test_a_template_matching_no_column_falls_back_to_every_text_column_and_says_so():
    import pandas as pd

    items = pd.DataFrame({"item_id": [7, 8], "name": ["Heat", "Up"], "about": ["A heist.", None]})
    # Some field matches: rendered as asked, nothing to say.
    assert render_catalogue_texts(items, "{name}. {genres}") == (["Heat", "Up"], "")
    texts, note = render_catalogue_texts(items, "{title}. {genres}")
    assert texts == ["Heat. A heist", "Up"]     # (the renderer drops a closing separator)
    assert "names none of the catalogue's columns (name, about)" in note and "'{name}. {about}'" in note
    assert "Set data.text_template" in note


def test_other_columns_come_in_through_the_star_field():
    import pandas as pd

    items = pd.DataFrame({"item_id": [7, 8], "name": ["Heat", "Up"], "brand": ["Acme", ""], "about": ["A heist.", None]})
    texts, note = render_catalogue_texts(items, "{title}. {brand}. {description}. {*}")
    assert texts == ["Acme. Heat. A heist", "Up"]          # named fields first, then the others in catalogue order
    assert note == "item text: {*} in data.text_template reads the catalogue's columns it does not name: name, about."
    # Nothing left to add: the same texts as without {*}, and nothing to say (the dev sets' case).
    assert render_catalogue_texts(items, "{name}. {brand}. {about}. {*}") == (
        render_item_texts(items, "{name}. {brand}. {about}"), "")


def test_a_catalogue_without_text_is_said():
    import pandas as pd

    texts, note = render_catalogue_texts(pd.DataFrame({"item_id": [1, 2]}), "{title}")
    assert texts == ["", ""]
    assert "every item's text is empty" in note and "catalogue columns: none but item_id" in note
    texts, note = render_catalogue_texts(pd.DataFrame({"item_id": [1], "title": [""]}), "{title}")
    assert texts == [""] and "every item's text is empty" in note


def test_user_text_is_newest_first_truncated_and_closed_with_sep():
    text = ItemText([[10, 11], [20], [30, 31, 32]], cls_id=1, sep_id=2, pad_id=0)
    assert text.user_tokens([2, 0, 1], max_length=100) == [1, 30, 31, 32, 2, 10, 11, 2, 20, 2]
    # Whole items while they fit; the item that does not fit is cut and the row still closes with [SEP].
    assert text.user_tokens([2, 0, 1], max_length=7) == [1, 30, 31, 32, 2, 10, 2]
    assert text.user_tokens([2, 0, 1], max_length=6) == [1, 30, 31, 32, 2]
    assert text.user_tokens([2, 0, 1], max_length=4) == [1, 30, 31, 2]


def test_removed_options_load_at_their_kept_value_and_refuse_the_removed_behaviour():
    # Artifacts saved before model.gate / model.score / model.temperature were removed carry them at the
    # value that behaves as today: those still load. Asking for the removed behaviour says so.
    cfg = config_from_dict({"model": {"gate": False, "score": "dot", "temperature": 0.1}})
    assert not hasattr(cfg.model, "gate") and not hasattr(cfg.model, "score")
    with pytest.raises(ConfigError, match=r"model.gate=True: this option was removed .* or set it to False"):
        config_from_dict({"model": {"gate": True}})
    with pytest.raises(ConfigError, match=r"model.score='cosine': this option was removed"):
        config_from_dict({"model": {"score": "cosine"}})
    # train.target_gap_max lost its ablation: 0 (next item only) still loads, 1 names the removal.
    assert not hasattr(config_from_dict({"train": {"target_gap_max": 0}}).train, "target_gap_max")
    with pytest.raises(ConfigError, match=r"train.target_gap_max=1: this option was removed .* or set it to 0"):
        config_from_dict({"train": {"target_gap_max": 1}})


def test_item_texts_are_cut_at_item_text_tokens_and_cached_per_budget(tmp_path):
    """Known answer: two item texts that agree on their first words and differ after them embed identically
    under a budget that ends inside the shared part and differently under one that reaches the difference;
    each budget has its own cache file, and a cached table equals a fresh encoding."""
    from raysparse.model.text import build_tiny_encoder, cached_item_embeddings, encode_texts, load_encoder

    shared = "alpha beta gamma delta epsilon zeta eta theta"              # 8 words: [CLS] + 8 + [SEP] = 10
    texts = [f"{shared} iota kappa", f"{shared} lambda mu"]
    encoder, tokenizer = load_encoder(build_tiny_encoder(tmp_path / "enc", texts))
    cache = tmp_path / "cache"
    short = cached_item_embeddings(encoder, tokenizer, texts, "mean", "tiny", cache, max_length=8)
    full = cached_item_embeddings(encoder, tokenizer, texts, "mean", "tiny", cache, max_length=32)
    torch.testing.assert_close(short[0], short[1])            # cut inside the shared words: one text
    assert not torch.allclose(full[0], full[1])               # the words after them count
    assert len(list(cache.glob("item_text_*.safetensors"))) == 2
    torch.testing.assert_close(cached_item_embeddings(encoder, tokenizer, texts, "mean", "tiny", cache,
                                                      max_length=8),
                               encode_texts(encoder, tokenizer, texts, "mean", max_length=8))
    with pytest.raises(ConfigError, match="item_text_tokens"):
        config_from_dict({"data": {"item_text_tokens": 4}})


def test_the_tiny_encoders_tokenizer_gives_each_word_its_own_token(tmp_path):
    """Known answer: under transformers 5 the tiny tokenizer was built from an ignored argument and read every
    word as [UNK], so every test's item texts were the same text to the encoder."""
    from raysparse.model.text import build_tiny_encoder, load_encoder

    _, tokenizer = load_encoder(build_tiny_encoder(tmp_path / "enc", ["Galaxy rocket.", "castle dragon"]))
    ids = tokenizer("galaxy rocket castle dragon . comet")["input_ids"]
    words, unknown = ids[1:-2], ids[-2]
    assert len(set(words)) == 5 and tokenizer.unk_token_id not in words
    assert unknown == tokenizer.unk_token_id                 # a word the texts never had


def test_texts_are_encoded_in_length_sorted_batches_and_returned_in_their_order(tmp_path):
    """Known answer: each text's embedding equals the text encoded alone (no padding at all), whatever the
    lengths of the texts batched with it, and the rows come back in the order given; no text: no rows."""
    from raysparse.model.text import build_tiny_encoder, encode_texts, load_encoder

    texts = ["alpha beta gamma delta epsilon zeta", "eta", "theta iota kappa", "lambda", "mu nu xi omicron pi"]
    encoder, tokenizer = load_encoder(build_tiny_encoder(tmp_path / "enc", texts))
    together = encode_texts(encoder, tokenizer, texts, "mean", max_length=16, batch_size=2)
    alone = torch.cat([encode_texts(encoder, tokenizer, [t], "mean", max_length=16) for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1])
    assert encode_texts(encoder, tokenizer, [], "mean").shape == (0, encoder.config.hidden_size)
