"""The LM evaluation's config, text windows and command-line errors (no model needed; the
end-to-end run on the packaged model is in test_llama.py, which loads it once)."""

from __future__ import annotations

import pytest

from jax_tokens import lm_eval
from jax_tokens.train.schema import ConfigError


def _words(text):
    """A stand-in tokenizer: one id per whitespace-separated word."""
    return list(range(len(text.split())))


def test_default_config_loads_and_names_real_files():
    config = lm_eval.load_config()
    assert config.data.context_length == 1024 and config.data.num_samples == 16
    lm_eval.check_files(config)          # Debian's base-files licences are on this machine


@pytest.mark.parametrize("overrides, match", [
    ({"data.context_len": 5}, r"unknown config key 'config.data.context_len'.*context_length"),
    ({"data.context_length": 0}, r"config.data.context_length=0 is not allowed: it must be an "
                                 r"int >= 1"),
    ({"model.dtype": "float16"}, r"config.model.dtype='float16' is not allowed"),
    ({"eval.batch_size": -1}, r"config.eval.batch_size=-1 is not allowed"),
    ({"data.files": ()}, r"config.data.files=\(\) is not allowed: it must be a non-empty"),
])
def test_bad_config_names_key_value_and_what_is_allowed(overrides, match):
    with pytest.raises(ConfigError, match=match):
        lm_eval.load_config(lm_eval.DEFAULT_CONFIG, overrides)


def test_windows_take_the_files_in_turn(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("w " * 25)          # 2 windows of 10 words
    b.write_text("w " * 12)          # 1 window
    config = lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {
        "data.files": (str(a), str(b)), "data.context_length": 7,
        "data.continuation_length": 3, "data.num_samples": 3})
    contexts, conts, sources = lm_eval.text_windows(config, _words)
    assert sources == [str(a), str(b), str(a)]
    assert [len(c) for c in contexts] == [7] * 3 and [len(c) for c in conts] == [3] * 3
    assert contexts[2] == list(range(10, 17)) and conts[2] == [17, 18, 19]
    config.data.num_samples = 4
    with pytest.raises(ValueError, match=r"num_samples=4: the files hold only 3 windows of 10 "
                                         r"tokens"):
        lm_eval.text_windows(config, _words)


def test_cli_errors_are_one_line(capsys, tmp_path):
    cases = [
        (["--config.data.files=('/nonexistent/text',)"],
         "config.data.files: /nonexistent/text does not exist"),
        (["--config.data.num_samples=0"], "config.data.num_samples=0 is not allowed"),
        (["--config.data.continuation_lenght=3"], "unknown config key"),
        (["--config", str(tmp_path / "none.py")], "does not exist"),
    ]
    for argv, msg in cases:
        assert lm_eval.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)


def test_press_group():
    config = lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {
        "press.method": "snapkv", "press.window": 16, "press.compression_ratio": 0.5})
    press = lm_eval.press_from_config(config)
    assert press.method == "snapkv" and press.window == 16 and press.compression_ratio == 0.5
    assert lm_eval.press_from_config(lm_eval.load_config()) is None
    with pytest.raises(ConfigError, match=r"config.press: press.windw is not a field of press "
                                          r"'snapkv'"):
        lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {"press.method": "snapkv",
                                                     "press.windw": 3})
    with pytest.raises(ConfigError, match=r"config.press: press.compression_ratio=1.5 must be"):
        lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {"press.method": "knorm",
                                                     "press.compression_ratio": 1.5})
    with pytest.raises(ConfigError, match=r"press.method='fastkv' is not one of the registered"):
        lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {"press.method": "fastkv"})
