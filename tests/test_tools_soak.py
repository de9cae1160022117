"""tools.soak's own arguments, and that its checks can fail (the soak itself is a long run, not part of the
suite: docs/reliability.md)."""

import json

import pytest

from tools.soak import main


@pytest.mark.parametrize("argv, message", [
    # its oversized traffic expects a 413 one byte past the limit, which a running server does not tell
    (["--url", "http://127.0.0.1:9", "--pid", "1"], "--url needs --body-bytes: the running server's "
                                                    "--max-request-body-bytes"),
    (["--body-bytes", "0"], "--body-bytes must be at least 1"),
    (["--concurrency", "0"], "--concurrency at least 1"),
    (["--duration", "0"], "--duration must be positive"),
    (["--warmup", "-1"], "--warmup at least 0"),
    (["--long-tokens", "0"], "--long-tokens must be at least 1"),
])
def test_soak_refuses_a_body_limit_it_cannot_know(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_soak_whose_valid_streams_are_refused_fails(tmp_path, capsys):
    """A server that refuses the soak's valid streams with a well-formed 400 (its completion limit is below
    what they ask) fails the soak: a 4xx on valid traffic is no pass, and a kind that never got served
    tested nothing."""
    out = tmp_path / "summary.json"
    status = main(["--only", "stream", "--duration", "3", "--warmup", "0", "--concurrency", "2",
                   "--server-arg=--max-completion-tokens=1", "--json-out", str(out)])
    summary = json.loads(out.read_text())
    assert status == 1, summary
    assert summary["outcomes_incl_warmup"].get("stream:400", 0) > 0
    assert "unexpected responses" in summary["failures"], summary["failures"]
    assert any("setting max_completion_tokens" in line for line in summary["unexpected"]), summary["unexpected"]
