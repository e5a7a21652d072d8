"""`activemoe profile`: measures and saves; the miss cost model it feeds is linear in tokens."""
import json
import os

from activemoe.cli import main
from activemoe.hardware import host_label, machine_label
from tests.test_cli import assert_user_error


def test_profile_saves_a_complete_profile(capsys, checkpoint, tmp_path):
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", str(checkpoint("gpt_oss")), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert saved["host"] == host_label()
    assert saved["device"] == "cpu" and saved["h2d_pinned_gbps"] is None and saved["recommend_experts_on"] == "host"
    assert saved["host_copy_gbps"] > 0 and saved["disk_read_gbps"] > 0
    assert set(saved["expert_host_ms"]) == {"1", "8", "64"} and all(v > 0 for v in saved["expert_host_ms"].values())
    assert saved["decode_layer_ms"] > 0  # the simulator's per-layer time (costmodel.from_profile)
    assert saved["load_overhead_ms"] >= 0  # its per-transfer latency
    assert not list(tmp_path.glob(".*.tmp"))


def test_profile_bad_output_directory(capsys, checkpoint, tmp_path):
    assert_user_error(capsys, ["profile", "--model", str(checkpoint("qwen3_moe")), "--out",
                               str(tmp_path / "nope" / "p.json")], "does not exist")


def test_results_name_the_machine_and_where_the_work_ran():
    host = host_label()
    assert host.endswith(f", {os.cpu_count()} cores")
    assert machine_label("cpu") == f"{host}, CPU only"
    assert machine_label("meta") == f"meta, host {host}"  # a device this host names without CUDA
