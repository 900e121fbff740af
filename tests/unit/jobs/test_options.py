"""moekit.jobs.options.PresetOptions: preset-sized options, their defaults and the words that restore them."""

import argparse
from types import SimpleNamespace

import pytest

from moekit.jobs import options

SIZED = options.PresetOptions({"dim": (options.positive_int, "width"), "clip": (options.positive_float, "clip")},
                              {"clip": 1.0})
PRESET = {"dim": 64}


def _parse(argv):
    parser = argparse.ArgumentParser()
    SIZED.add_to(parser)
    return parser, parser.parse_args(argv)


def test_given_options_win_over_the_preset_and_the_fixed_defaults():
    _, args = _parse([])
    assert SIZED.values(args, PRESET) == {"dim": 64, "clip": 1.0}
    _, args = _parse(["--dim", "8", "--clip", "0.5"])
    assert SIZED.values(args, PRESET) == {"dim": 8, "clip": 0.5}


def test_help_names_the_default_and_bad_values_are_refused():
    parser, _ = _parse([])
    text = parser.format_help()
    assert "width (default: from --preset)" in text and "clip (default: 1.0)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--dim", "0"])


def test_words_restore_only_what_differs_from_the_preset():
    assert SIZED.words(SimpleNamespace(dim=64, clip=1.0), PRESET) == []
    assert SIZED.words(SimpleNamespace(dim=32, clip=1.0), PRESET) == ["--dim", "32"]
