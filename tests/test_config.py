import pytest

from captioner.cli import main
from captioner.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_committed_recipe_loads():
    cfg = load_config("configs/flickr8k.yaml")
    assert cfg.data.format == "flickr8k" and cfg.model.decoder == "attention"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.01\n"), ["train.lr=3e-4", "model.hidden_dim=64"])
    assert cfg.train.lr == 3e-4 and cfg.model.hidden_dim == 64


@pytest.mark.parametrize("text, message", [
    ("train:\n  learning_rate: 0.1\n", "unknown key.*train.learning_rate"),
    ("train:\n  epochs: many\n", "train.epochs: expected int"),
    ("model:\n  decoder: transformer\n", "model.decoder must be"),
    ("bogus: 1\n", "unknown key.*bogus"),
    ("train: [1, 2]\n", "expected a mapping"),
    ("model:\n  dropout: true\n", "model.dropout"),
    ("model:\n  feature_dropout: 1.0\n", "model.feature_dropout must be in"),
    ("model:\n  image_size: 16\n", "model.image_size must be 0"),
    ("model:\n  decoder: show_tell\n  deep_output: true\n", "model.deep_output needs model.decoder: attention"),
    ("model:\n  encoder_head: -1\n", "model.encoder_head must be >= 0"),
    ("train:\n  encoder_head_lr: -0.1\n", "train.encoder_head_lr must be >= 0"),
    ("1: 2\n", "unknown key.*1"),  # keys that are not strings: YAML reads 1, yes/on, ~ as int, bool, None
    ("model:\n  on: 1\n", "unknown key.*model.True"),
    ("model:\n  ~: 1\n  bogus: 2\n", "unknown key.*model.None"),
    ("train:\n  seed: 18446744073709551616\n", r"train.seed must be in 0..4294967295"),  # torch overflowed
    ("train:\n  seed: -1\n", r"train.seed must be in 0..4294967295"),
])
def test_bad_configs_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_data_path_fails_before_any_work(tmp_path, capsys):
    path = write(tmp_path, f"data:\n  root: {tmp_path / 'nowhere'}\ntrain:\n  out_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "data.root" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_fifo_given_as_config_is_named_not_a_regular_file(tmp_path):
    import os

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="recipe.yaml is not a regular file"):  # was "does not exist"
        load_config(fifo)


def test_an_override_value_is_taken_as_written_where_yaml_would_cut_it(tmp_path):
    """`--set train.out_dir=/runs/exp #2` became `/runs/exp` (a YAML comment), and a newline became a space."""
    cfg = load_config(None, ["train.out_dir=/runs/exp #2", "data.cache_dir=/cache/new\nline",
                             "train.epochs=3", 'decode.length_penalty=0.5'])
    assert cfg.train.out_dir == "/runs/exp #2" and cfg.data.cache_dir == "/cache/new\nline"
    assert cfg.train.epochs == 3 and cfg.decode.length_penalty == 0.5
    assert load_config(None, ['train.out_dir="/runs/a #b"']).train.out_dir == "/runs/a #b"  # quoted: YAML's reading
    assert load_config(None, ["train.out_dir=!!str 2024"]).train.out_dir == "2024"  # a YAML tag still works


def test_one_config_problem_is_one_line_and_several_are_listed(tmp_path, capsys):
    """The CLI's errors before any work are one line on stderr; a config error with one problem used to take two
    ("invalid config:" and the problem below it)."""
    one = write(tmp_path, "train:\n  epochs: many\n")
    assert main(["train", "--config", str(one), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["captioner: error: invalid config: train.epochs: expected int, got str 'many'"]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "train:\n  lr: -1\n  epochs: 0\n"))
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 3
    assert all(line.startswith("  - train.") for line in lines[1:])
