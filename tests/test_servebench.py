"""`xception bench --mode serve`: the load test runs its three rows against real servers (a tiny checkpoint,
71 px, two clients, two seconds a row) and reports them without errors; a bad flag is a one-line error.
Speeds are the benchmark's business: only the report's shape is checked here."""

import json

import pytest

from conftest import run_cli
from xception import cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from test_serve import noise_image, tiny_checkpoint  # noqa: E402  (needs the serve extra, checked above)

ROW_KEYS = ("setting", "max_batch", "requests", "requests_per_s", "p50_ms", "p99_ms", "http_errors",
            "connection_errors", "mean_batch", "ratio_to_batch1", "load_avg_1m")


def test_serve_bench_reports_three_rows_without_errors(tmp_path):
    weights = tiny_checkpoint(tmp_path / "tiny.pth.tar")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        noise_image(images / f"{i}.{'png' if i % 2 else 'jpg'}", seed=i)
    proc = run_cli("bench", "--mode", "serve", "--weights", weights, "--images", images, "--clients", 2,
                   "--duration", 2, "--threads", 1, "--max-batch", 4, "--json", env={"OMP_NUM_THREADS": "1"},
                   timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["mode"] == "serve" and result["image_size"] == 71 and result["images"] == 3
    rows = result["rows"]
    assert [r["max_batch"] for r in rows] == [4, 1, 1]
    assert rows[2]["setting"].startswith("in-process")
    for r in rows:
        for key in ROW_KEYS:
            assert key in r, (key, r)
        assert r["requests"] > 0 and r["http_errors"] == 0 and r["connection_errors"] == 0, r
        assert r["p50_ms"] <= r["p99_ms"] and 1 <= r["mean_batch"] <= r["max_batch"]
    assert rows[1]["ratio_to_batch1"] == pytest.approx(1.0) and rows[1]["mean_batch"] == 1
    for r in rows[:2]:
        assert r["exit_code"] == 0  # each server stopped gracefully on SIGTERM
        assert r["client_cpu_ms_per_request"] > 0


@pytest.mark.parametrize("flags, said", [(["--clients", "0"], "--clients must be at least 1"),
                                         (["--duration", "0"], "--duration must be in"),
                                         ([], "--mode serve needs --weights")])
def test_serve_bench_bad_flags_are_one_line_errors(capsys, flags, said):
    weights = [] if not flags else ["--weights", __file__]  # an existing file: the flag under test is refused
    assert cli.main(["bench", "--mode", "serve", *weights, *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and said in err
