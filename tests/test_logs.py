"""Notes and warnings go through logging: quiet in the library unless asked, on stderr in the CLI."""

from __future__ import annotations

import logging

from click.testing import CliRunner

from softcache.cache_job import run_cache
from softcache.cli import main


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


def test_notes_reach_the_softcache_logger_and_progress_off_keeps_them_quiet(cache_config, tmp_path):
    logger, records = logging.getLogger("softcache"), Records()
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        run_cache(cache_config(out=str(tmp_path / "a"), progress=True))
        assert any(message.startswith("teacher ") for _, message in records.messages)
        assert any(message.startswith("corpus ") for _, message in records.messages)
        records.messages.clear()
        run_cache(cache_config(out=str(tmp_path / "b"), progress=False))
        assert [m for level_no, m in records.messages if level_no < logging.WARNING] == []
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


def test_the_cli_prints_notes_on_the_stderr_of_each_call(cache_config, tmp_path):
    config = cache_config()
    base = ["cache", "--teacher", config.teacher, "--data", config.data, "--seq-len", 32, "--max-sequences", 6,
            "--k", 4, "--shard-size", 3]
    for name in ("first", "second"):  # a second call in one process prints to its own stderr
        result = CliRunner().invoke(main, [str(a) for a in [*base, "--out", tmp_path / name]])
        assert result.exit_code == 0, result.output
        assert "corpus " in result.stderr and "wrote 6 sequences" in result.stdout
    quiet = CliRunner().invoke(main, [str(a) for a in [*base, "--out", tmp_path / "quiet", "--no-progress"]])
    assert quiet.exit_code == 0 and quiet.stderr == ""
