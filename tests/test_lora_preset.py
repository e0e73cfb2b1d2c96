"""An mlx_lm.lora YAML config as a preset: ``--yourai-lora-config``, ``lora_config`` in a
presets file, the model from a directory or the local Hugging Face cache, the pre-flight's
decision, the refusals, and ``yourai check`` agreeing with the pre-flight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_LLAMA_CONFIG, events, read_log

TINY_LLAMA = {**TINY_LLAMA_CONFIG, "num_hidden_layers": 4}


def model_dir(root: Path, name: str = "tiny-model", **extra: object) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**TINY_LLAMA, **extra}))
    return directory


def write_yaml(root: Path, text: str, name: str = "lora.yaml") -> Path:
    path = root / name
    path.write_text(text)
    return path


def usage_error(bench: pytest.Pytester, line: str) -> None:
    """The YAML preset's run stops with one usage line (exit 4), and no traceback."""
    result = bench.runpytest_subprocess(
        "--yourai-lora-config", "lora.yaml", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([line])
    assert "Traceback" not in result.stderr.str()


BASE = "model: tiny-model\nbatch_size: 2\nnum_layers: 3\nmax_seq_length: 64\n"


def run_yourai(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from pytest_yourai.cli import main; sys.exit(main())",
         *args],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def test_a_yaml_is_a_preset_with_its_pins(bench: pytest.Pytester) -> None:
    model_dir(bench.path, quantization={"bits": 4, "group_size": 32})
    write_yaml(bench.path, BASE + "lora_parameters: {rank: 4, scale: 10.0, dropout: 0.0}\n")
    result = bench.runpytest(
        "--yourai-lora-config",
        "lora.yaml",
        "--yourai-estimate-only",
        "-v",
        "-p",
        "no:cacheprovider",
    )
    result.stdout.fnmatch_lines(["*test_lora_memory[[]lora[]]*"])
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    assert check["preset"] == "lora"
    assert (check["batch_size"], check["lora_layers"], check["lora_rank"]) == (2, 3, 4)
    assert check["seq_len"] == 63  # mlx-lm pads to max_seq_length; the model sees one less
    assert check["bits"] == 4
    assert check["estimated_conservative_gb"] > 0


def test_a_presets_file_names_a_yaml(bench: pytest.Pytester) -> None:
    (bench.path / "configs").mkdir()
    model_dir(bench.path / "configs")
    write_yaml(bench.path / "configs", BASE)
    bench.path.joinpath("presets.toml").write_text(
        '[presets.my-finetune]\nlora_config = "configs/lora.yaml"\n'
    )
    result = bench.runpytest(
        "--yourai-presets-file", "presets.toml", "--yourai-presets", "my-finetune",
        "--yourai-estimate-only", "-v", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.stdout.fnmatch_lines(["*test_lora_memory[[]my-finetune[]]*"])


def test_a_repo_id_is_found_in_the_local_hugging_face_cache(
    bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = bench.path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "abc123"
    model_dir(snapshot.parent, "abc123")
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_yaml(bench.path, BASE.replace("tiny-model", "tiny-org/tiny-llama"))
    result = bench.runpytest_subprocess(
        "--yourai-lora-config", "lora.yaml", "--yourai-estimate-only", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    assert check["lora_layers"] == 3


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        (BASE + "batch_sise: 4\n", "*lora.yaml*batch_sise*batch_size*"),
        (BASE + "grad_checkpoint: maybe\n", "*lora.yaml*grad_checkpoint*maybe*"),
        (BASE.replace("tiny-model", "nobody/nothing"), "*nobody/nothing*Hugging Face cache*"),
        (BASE + "data: no-such-data\n", "*data*no-such-data*"),
        (BASE + "fine_tune_type: full\n", "*full on a 4-bit model*"),
        (BASE.replace("num_layers: 3", "num_layers: 9"), "*9 layers*only has 4 layers*"),
        (
            BASE
            + "lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0, keys: [q_proj, v_proj]}\n",
            "*lora.yaml*keys*q_proj*v_proj*match no layer*self_attn.q_proj*",
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "repo-not-cached",
        "no-data",
        "full-quantized",
        "layers",
        "keys-match-nothing",
    ],
)
def test_bad_input_is_one_usage_line_and_the_log_keeps_what_it_had(
    bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, yaml: str, expected: str
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(bench.path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir(bench.path, quantization={"bits": 4, "group_size": 32})
    write_yaml(bench.path, yaml)
    log = bench.path / "benchmark_log.jsonl"
    log.write_text('{"event": "earlier"}\n')
    result = bench.runpytest_subprocess(
        "--yourai-lora-config", "lora.yaml", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {expected}"])
    assert "Traceback" not in result.stderr.str()
    assert log.read_text() == '{"event": "earlier"}\n'


def test_dora_with_dropout_on_chosen_keys_is_estimated(bench: pytest.Pytester) -> None:
    model_dir(bench.path)
    write_yaml(
        bench.path,
        BASE + "fine_tune_type: dora\nlora_parameters: {rank: 8, scale: 20.0, dropout: 0.1, "
        "keys: [self_attn.q_proj, self_attn.v_proj]}\n",
    )
    result = bench.runpytest(
        "--yourai-lora-config", "lora.yaml", "--yourai-estimate-only", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(skipped=1)  # estimate only: the pre-flight, then no probe
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    assert check["estimated_conservative_gb"] is not None and check["decision"] == "run"


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_dora_where_mlx_lm_sizes_its_adapters_wrong_is_a_usage_error(
    bench: pytest.Pytester, bits: int
) -> None:
    """mlx-lm's DoRALinear.from_base multiplies the packed width by 32 // bits: right for 2, 4
    and 8 bits, wrong for 3, 5 and 6, and the first step fails on the matmul's shapes."""
    model_dir(bench.path, quantization={"bits": bits, "group_size": 32})
    write_yaml(bench.path, BASE + "fine_tune_type: dora\n")
    usage_error(bench, f"ERROR: *lora.yaml*dora on a {bits}-bit model*")


def test_dora_on_a_four_bit_model_is_not_refused(tmp_path: Path) -> None:
    model_dir(tmp_path, quantization={"bits": 4, "group_size": 32})
    write_yaml(tmp_path, BASE + "fine_tune_type: dora\n")
    checked = run_yourai("check", str(tmp_path / "lora.yaml"), "--backend", "cpu")
    assert checked.returncode in (0, 1), checked.stdout + checked.stderr


def test_dora_on_a_mixture_of_experts_is_a_usage_error(bench: pytest.Pytester) -> None:
    model_dir(bench.path, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    write_yaml(bench.path, BASE + "fine_tune_type: dora\n")
    usage_error(bench, "ERROR: *lora.yaml*dora on *switch_mlp*SwitchLinear*")


def test_what_the_estimator_cannot_model_is_refused_by_name(bench: pytest.Pytester) -> None:
    model_dir(bench.path)
    write_yaml(
        bench.path,
        BASE + "optimizer: adafactor\noptimizer_config: {adafactor: {beta_1: 0.9}}\n",
    )
    result = bench.runpytest(
        "--yourai-lora-config", "lora.yaml", "--yourai-estimate-only", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(skipped=1)
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    assert "not modeled yet" in check["reason"] and "beta_1" in check["reason"]
    assert check["estimated_conservative_gb"] is None


def test_the_probe_gets_what_the_yaml_asks(bench: pytest.Pytester) -> None:
    model_dir(bench.path)
    write_yaml(
        bench.path,
        BASE + "optimizer: adamw\noptimizer_config: {adamw: {weight_decay: 0.1}}\n"
        "lora_parameters: {rank: 4, scale: 10.0, dropout: 0.0}\nval_batches: 3\n",
    )
    spec_out = bench.path / "spec.json"
    probe = bench.path / "probe.py"
    probe.write_text(
        "import json, os, sys\n"
        f"open({str(spec_out)!r}, 'w').write(os.environ['YOURAI_PROBE_SPEC'])\n"
        "print('BENCHMARK_RESULT: ' + json.dumps({'status': 'ok', 'phase': 'done', "
        "'peak_memory_gb': 0.01, 'train_peak_memory_gb': 0.01}), flush=True)\n"
    )
    result = bench.runpytest(
        "--yourai-lora-config", "lora.yaml", "--yourai-probe-command",
        f"{sys.executable} {probe}", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    spec = json.loads(spec_out.read_text())
    run = spec["lora_run"]
    assert run["optimizer"] == "adamw" and run["optimizer_config"] == {"weight_decay": 0.1}
    assert run["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0}
    assert (run["num_layers"], run["val_batches"]) == (3, 3)
    assert spec["model_dir"] == str(bench.path / "tiny-model")


@pytest.mark.parametrize("memory_gb", [2.05, 2.3, 12.0])
def test_yourai_check_agrees_with_the_pre_flight(bench: pytest.Pytester, memory_gb: float) -> None:
    model_dir(bench.path)
    write_yaml(bench.path, BASE.replace("batch_size: 2", "batch_size: 8"))
    checked = run_yourai("check", str(bench.path / "lora.yaml"), "--memory", str(memory_gb),
                         "--backend", "cpu", "--json")  # fmt: skip
    assert checked.returncode in (0, 1), checked.stderr
    answer = json.loads(checked.stdout)
    bench.runpytest(
        "--yourai-lora-config", "lora.yaml", "--yourai-estimate-only", "-p", "no:cacheprovider",
        "--yourai-max-memory", str(memory_gb),
    )  # fmt: skip
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    if check["available_gb"] < memory_gb:  # this machine has less free than the cap
        pytest.skip(f"this machine has {check['available_gb']} GB free, under {memory_gb}")
    for key in ("decision", "estimated_base_gb", "estimated_conservative_gb", "batch_size",
                "lora_layers", "seq_len"):  # fmt: skip
        assert answer[key] == check[key], key
    assert checked.returncode == (0 if check["decision"] == "run" else 1)
    if "nearest" in answer:  # a smaller config that fits, by the same rule
        assert checked.returncode == 1 and answer["nearest"]["decision"] == "run"


def test_yourai_check_text_says_what_to_change(tmp_path: Path) -> None:
    model_dir(tmp_path)
    write_yaml(tmp_path, "model: tiny-model\nbatch_size: 64\nnum_layers: 3\nmax_seq_length: 1024\n")
    checked = run_yourai(
        "check", str(tmp_path / "lora.yaml"), "--memory", "2.4", "--backend", "cpu"
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "does not fit" in checked.stdout
    assert "nearest config that fits, change in the YAML:" in checked.stdout
    assert "batch_size: " in checked.stdout


def test_yourai_check_usage_error_is_exit_4(tmp_path: Path) -> None:
    write_yaml(tmp_path, "model: nowhere\nbatch_size: two\n")
    checked = run_yourai("check", str(tmp_path / "lora.yaml"))
    assert checked.returncode == 4
    assert checked.stderr.count("\n") == 1 and "batch_size" in checked.stderr


def test_a_config_mlx_lm_reads_elsewhere_is_refused_naming_both(tmp_path: Path) -> None:
    """Gemma-4's text fields at the top level: mlx-lm builds its default Gemma-4 silently."""
    from pytest_yourai.presets import mlx_lm_model_types

    if "gemma4" not in (mlx_lm_model_types() or ()):
        pytest.skip("this mlx-lm has no gemma4")
    directory = tmp_path / "gemma"
    directory.mkdir()
    config = {**TINY_LLAMA, "model_type": "gemma4", "head_dim": 32}
    (directory / "config.json").write_text(json.dumps(config))
    write_yaml(tmp_path, "model: gemma\nbatch_size: 1\nnum_layers: 2\nmax_seq_length: 64\n")
    checked = run_yourai("check", str(tmp_path / "lora.yaml"), "--backend", "cpu")
    assert checked.returncode == 4, checked.stdout + checked.stderr
    assert checked.stderr.count("\n") == 1
    assert "num_hidden_layers 4" in checked.stderr  # the config's
    assert "vocab_size 256" in checked.stderr and "vocab_size 262144" in checked.stderr


def data_case(root: Path, rows: list[int], valid: list[int], max_seq_length: int) -> Path:
    """A model directory with a tokenizer, a data directory, and the YAML naming both."""
    from tests.test_probe_lora import text, write_tokenizer

    write_tokenizer(root / "model")
    (root / "data").mkdir()
    for name, lengths in (("train", rows), ("valid", valid)):
        lines = [json.dumps(text(n)) for n in lengths]
        (root / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return write_yaml(
        root,
        f"model: model\ndata: data\nbatch_size: 2\nnum_layers: 1\nmax_seq_length: "
        f"{max_seq_length}\nval_batches: 1\n",
    )


def test_the_longest_batch_the_data_makes_sets_the_estimate(bench: pytest.Pytester) -> None:
    # consecutive rows form batches (mlx-lm's sort keys on the row's size): (5, 40), (12, 70)...
    data_case(bench.path, [5, 40, 12, 70, 3, 33, 31, 8], [10, 20], max_seq_length=64)
    result = bench.runpytest("--yourai-lora-config", "lora.yaml", "--yourai-estimate-only", "-v")
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    # 70 words + EOS = 71 tokens, over 64: truncated; the batch is padded to max_seq_length
    assert check["longest_batch_tokens"] == [2, 64]
    assert check["seq_len"] == 63
    assert (check["data_rows"], check["truncated_rows"]) == (8, 1)
    result.stdout.fnmatch_lines(
        ["*Data: longest batch 2 × 64 tokens from *train.jsonl (1 rows truncated at 64)"]
    )
    # The answer is cached by content: the second run reads it from pytest's cache.
    (cached,) = (bench.path / ".pytest_cache" / "d" / "yourai-data").glob("*.json")
    summary = json.loads(cached.read_text())
    summary["train"]["longest"] = [2, 33]
    cached.write_text(json.dumps(summary))
    bench.runpytest("--yourai-lora-config", "lora.yaml", "--yourai-estimate-only")
    assert events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")[-1][
        "longest_batch_tokens"
    ] == [2, 33]


def test_without_long_rows_the_estimate_is_for_the_data_not_max_seq_length(
    tmp_path: Path,
) -> None:
    data_case(tmp_path, [5, 20, 12, 30, 3, 8], [10, 20], max_seq_length=2048)
    with_data = json.loads(
        run_yourai("check", str(tmp_path / "lora.yaml"), "--memory", "8", "--json").stdout
    )
    (tmp_path / "lora.yaml").write_text(
        (tmp_path / "lora.yaml").read_text().replace("data: data\n", "")
    )
    without = json.loads(
        run_yourai("check", str(tmp_path / "lora.yaml"), "--memory", "8", "--json").stdout
    )
    assert with_data["seq_len"] == 32  # 30 words + EOS, padded to 1 + 32·ceil(31/32) = 33
    assert without["seq_len"] == 2047
    assert with_data["estimated_base_gb"] < without["estimated_base_gb"]


def test_a_broken_data_line_is_named_with_its_file_and_line(bench: pytest.Pytester) -> None:
    data_case(bench.path, [5, 40, 12, 70], [10, 20], max_seq_length=64)
    with open(bench.path / "data" / "train.jsonl", "a") as handle:
        handle.write('{"text": "a a\n')
    usage_error(bench, "ERROR: *train.jsonl*5*")


def test_a_tokenizer_that_runs_code_is_refused_without_the_plugin_option(
    bench: pytest.Pytester,
) -> None:
    data_case(bench.path, [5, 40, 12, 70], [10, 20], max_seq_length=64)
    tokenizer_config = bench.path / "model" / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text())
    config.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["mine.Mine", None]})
    tokenizer_config.write_text(json.dumps(config))
    from pytest_yourai.lora_config import mlx_lm_config_defaults

    if "trust_remote_code" in mlx_lm_config_defaults():  # the YAML asking does not switch it on
        with open(bench.path / "lora.yaml", "a") as handle:
            handle.write("trust_remote_code: true\n")
    usage_error(bench, "ERROR: *trust_remote_code*--yourai-trust-remote-code")


def test_estimate_and_fit_take_the_yaml_too(tmp_path: Path) -> None:
    model_dir(tmp_path)
    config = str(write_yaml(tmp_path, BASE))
    estimate = run_yourai(
        "estimate", "--lora-config", config, "--backend", "cpu", "--available-gb", "8", "--json"
    )
    assert estimate.returncode == 0, estimate.stderr
    checked = run_yourai("check", config, "--memory", "8", "--backend", "cpu", "--json")
    record, answer = json.loads(estimate.stdout), json.loads(checked.stdout)
    assert record["estimated_conservative_gb"] == pytest.approx(
        answer["estimated_conservative_gb"], abs=1e-3
    )
    fitted = run_yourai("fit", "--lora-config", config, "--backend", "cpu", "--memory", "2.01,8")
    assert fitted.returncode == 0, fitted.stderr
    assert "| `lora` | – | b2 r8 L3 |" in fitted.stdout  # its own pins, where it fits
