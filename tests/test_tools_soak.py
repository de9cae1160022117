"""tools.soak's own arguments (the soak itself is a long run, not part of the suite: docs/reliability.md)."""

import pytest

from tools.soak import main


@pytest.mark.parametrize("argv, message", [
    # its oversized traffic expects a 413 one byte past the limit, which a running server does not tell
    (["--url", "http://127.0.0.1:9", "--pid", "1"], "--url needs --body-bytes: the running server's "
                                                    "--max-request-body-bytes"),
    (["--body-bytes", "0"], "--body-bytes must be at least 1"),
])
def test_soak_refuses_a_body_limit_it_cannot_know(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
