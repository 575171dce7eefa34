"""Unit tests of the process-edge helpers in wanps.rpc.config: config parsing, addresses."""
from __future__ import annotations

import pytest

from wanps.rpc.config import EnvDefaultsParser, split_host_port

PORT, RATE, NAME, VERBOSE, MODE = "WANPS_TEST_PORT", "WANPS_TEST_RATE", "WANPS_TEST_NAME", "WANPS_TEST_VERBOSE", "WANPS_TEST_MODE"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (PORT, RATE, NAME, VERBOSE, MODE):
        monkeypatch.delenv(name, raising=False)


def make_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="test")
    parser.add_argument("--port", env=PORT, type=int, default=7, help="the port")
    parser.add_argument("--rate", env=RATE, type=float, default=0.5)
    parser.add_argument("--name", env=NAME, default="anon")
    parser.add_argument("--verbose", env=VERBOSE, action="store_true")
    parser.add_argument("--mode", env=MODE, choices=("a", "b"), default="a")
    parser.add_argument("--plain", type=int, default=3)
    return parser


# ------------------------------------------------------------------------------ precedence


def test_defaults_without_env_or_flags() -> None:
    args = make_parser().parse_args([])
    assert (args.port, args.rate, args.name, args.verbose, args.mode, args.plain) == (7, 0.5, "anon", False, "a", 3)


def test_env_beats_default_and_is_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT, "50051")
    monkeypatch.setenv(RATE, "2.5e-3")
    monkeypatch.setenv(NAME, "site-b")
    monkeypatch.setenv(MODE, "b")
    args = make_parser().parse_args([])
    assert args.port == 50051 and type(args.port) is int
    assert args.rate == 0.0025 and type(args.rate) is float
    assert args.name == "site-b"
    assert args.mode == "b"


def test_flag_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT, "50051")
    monkeypatch.setenv(NAME, "from-env")
    args = make_parser().parse_args(["--port", "9000", "--name", "from-flag"])
    assert (args.port, args.name) == (9000, "from-flag")


def test_env_is_read_at_parse_time_not_at_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = make_parser()
    monkeypatch.setenv(PORT, "1234")  # set after add_argument
    assert parser.parse_args([]).port == 1234


def test_flags_without_env_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIN", "99")
    monkeypatch.setenv("WANPS_TEST_PLAIN", "99")
    assert make_parser().parse_args([]).plain == 3


def test_help_names_the_variable() -> None:
    text = make_parser().format_help()
    assert "[env WANPS_TEST_PORT]" in text
    assert "the port [env WANPS_TEST_PORT]" in " ".join(text.split())


# ------------------------------------------------------------------------------ store_true


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "On", " true "])
def test_store_true_from_env_truthy(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(VERBOSE, raw)
    assert make_parser().parse_args([]).verbose is True


@pytest.mark.parametrize("raw", ["0", "false", "no", "off", ""])
def test_store_true_from_env_falsy(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(VERBOSE, raw)
    assert make_parser().parse_args([]).verbose is False


def test_store_true_flag_beats_falsy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VERBOSE, "0")
    assert make_parser().parse_args(["--verbose"]).verbose is True


# ------------------------------------------------------------------------------ env values get the flag's checks


def test_env_value_outside_choices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODE, "bogus")
    with pytest.raises(SystemExit):
        make_parser().parse_args([])


def test_env_value_of_the_wrong_type_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT, "abc")
    with pytest.raises(SystemExit):
        make_parser().parse_args([])


def test_flag_of_the_wrong_type_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--port", "abc"])
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--mode", "bogus"])


def test_env_does_not_stick_to_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = make_parser()
    monkeypatch.setenv(PORT, "1234")
    assert parser.parse_args([]).port == 1234
    monkeypatch.delenv(PORT)
    assert parser.parse_args([]).port == 7


# ------------------------------------------------------------------------------ split_host_port


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:9090", ("localhost", 9090)),
        ("wanps-server:50051", ("wanps-server", 50051)),
        ("[::1]:50051", ("::1", 50051)),
        ("[::]:8080", ("::", 8080)),
        ("[2001:db8::7]:443", ("2001:db8::7", 443)),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize(
    "address", ["", "localhost", "localhost:", ":50051", "host:http", "host:-1", "host:5 0", "[::1]", "host:1.5"]
)
def test_split_host_port_errors(address: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        split_host_port(address)
