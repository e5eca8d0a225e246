"""The test S3 server itself (tests/s3_server.py): a start that does not finish says why, with weed's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.s3_server import SeaweedError, SeaweedS3


def test_a_server_not_ready_in_time_fails_with_the_stage_and_weeds_log_tail(tmp_path: Path) -> None:
    """Catches an unbounded wait, or a failure that hides what weed said."""
    server = SeaweedS3(tmp_path / "seaweedfs")
    with pytest.raises(SeaweedError) as info:
        server.start(timeout_s=1.0)  # weed server starts its S3 gateway after about 2 s
    message = str(info.value)
    assert "could not list buckets within 1 s" in message
    assert f"lines of {tmp_path / 'seaweedfs' / 'weed.log'}:\n" in message and "Start Seaweed" in message
    assert server.process is not None and server.process.poll() is not None  # killed, not left behind
