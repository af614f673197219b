"""SenseVoice tags become fields; smoke comparisons use a character error rate."""

from __future__ import annotations

from server.speech.richtext import char_error_rate, parse


def test_tags_become_fields_and_text_is_clean() -> None:
    r = parse("<|yue|><|ANGRY|><|Applause|><|withitn|> Stop that.")
    assert (r.text, r.language, r.emotion, r.events, r.itn) == ("Stop that.", "yue", "angry", ["applause"], True)


def test_unknown_event_and_emotion_and_tags_anywhere() -> None:
    r = parse("<|en|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>hello <|Laughter|> world <|FOO|>")
    assert r.text == "hello world"
    assert r.emotion == "unknown" and r.events == ["laughter"] and r.unknown_tags == ["FOO"]


def test_nospeech() -> None:
    r = parse("<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>")
    assert r.is_nospeech and r.text == ""


def test_character_error_rate() -> None:
    assert char_error_rate("Hello, world!", "hello world") == 0.0
    assert char_error_rate("abcd", "abxd") == 0.25
    assert char_error_rate("", "") == 0.0 and char_error_rate("", "x") == 1.0
