"""The nanochat-mlx command, run as a real subprocess on fixture models."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALL_VARIANTS, copy_variant, expected_json, variant_arch, variant_dir

CLI = [sys.executable, "-m", "nanochat_mlx.cli"]
HAS_TORCH = importlib.util.find_spec("torch") is not None
BACKENDS = ["mlx", pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed"))]


def nanochat(
    *args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        input=stdin.encode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def reference_reply(variant: str, case_name: str = "chat_completion") -> tuple[str, str, int]:
    """(user message, expected stdout reply, max tokens) of a fixture's greedy chat completion."""
    case = next(c for c in expected_json(variant, "generate.json")["cases"] if c["name"] == case_name)
    messages = expected_json(variant, "tokenizer_cases.json")["render_for_completion"]["conversation"]["messages"]
    user = next(m["content"] for m in messages if m["role"] == "user")
    want = case["text_row0"]
    if case["completed_early"]:
        want = want.removesuffix("<|assistant_end|>").removesuffix("<|bos|>")
    return user, want, case["max_tokens"]


def arch_args(variant: str) -> list[str]:
    arch = variant_arch(variant)
    return ["--arch", arch] if arch else []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_one_shot_greedy_reply_is_the_reference_reply(variant, backend):
    user, want, max_tokens = reference_reply(variant)
    r = nanochat(
        "--source", str(variant_dir(variant)), "-p", user, "-t", "0", "--max-tokens", str(max_tokens),
        "--backend", backend, *arch_args(variant),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == want + "\n"


def test_prompt_dash_reads_stdin():
    user, want, max_tokens = reference_reply("g9")
    r = nanochat("--source", str(variant_dir("g9")), "-p", "-", "-t", "0", "--max-tokens", str(max_tokens), stdin=user)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == want + "\n"


def test_stats_go_to_stderr_only():
    user, want, max_tokens = reference_reply("g5")
    r = nanochat(
        "--source",
        str(variant_dir("g5")),
        "-p",
        user,
        "-t",
        "0",
        "--max-tokens",
        str(max_tokens),
        "--stats",
        "--backend",
        "mlx",
    )
    assert r.stdout.decode() == want + "\n"
    err = r.stderr.decode()
    assert "tok/s" in err and "ttft" in err and "mlx cpu float32" in err
    assert "ambiguous" in err  # g5 on disk could be g6/g7: said on stderr


def test_repl_runs_two_turns_clear_and_quit():
    r = nanochat(
        "--source",
        str(variant_dir("g9")),
        "-t",
        "0",
        "--max-tokens",
        "8",
        stdin="hello\nsecond turn\nclear\nhello\nquit\nnever sent\n",
    )
    assert r.returncode == 0, r.stderr.decode()
    replies = r.stdout.decode().split("\n")[:3]
    assert len(replies) == 3
    assert replies[0] == replies[2]  # after clear, the same greeting gets the same greedy reply
    assert "cleared" in r.stderr.decode()


@pytest.mark.parametrize("quit_line", ["Quit", "EXIT", "  exit  "])
def test_repl_commands_work_in_any_case_and_with_spaces_around(quit_line):
    r = nanochat(
        "--source", str(variant_dir("g9")), "-t", "0", "--max-tokens", "8",
        stdin=f"hello\n  CLEAR \nhello\n{quit_line}\nnever sent\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    replies = r.stdout.decode().split("\n")
    assert len(replies) == 3 and replies[0] == replies[1]  # cleared, then quit before "never sent"
    assert "cleared" in r.stderr.decode()


def test_repl_exits_cleanly_at_end_of_input():
    r = nanochat("--source", str(variant_dir("g1")), "-t", "0", "--max-tokens", "4", stdin="hi\n")
    assert r.returncode == 0
    assert r.stdout.decode().count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["-t", "-1"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--max-tokens", "-3"],
        ["--dtype", "float64"],
        ["--backend", "cuda"],
        ["--quantize", "3"],
        ["--arch", "g42"],
    ],
)
def test_invalid_options_are_rejected_with_a_short_message(args):
    r = nanochat("--source", str(variant_dir("g1")), "-p", "hi", *args)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "Traceback" not in err and err.strip()
    assert r.stdout == b""


def test_missing_source_is_a_one_line_error(tmp_path):
    r = nanochat("--source", str(tmp_path / "nope"), "-p", "hi")
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1 and "nope" in r.stderr.decode()


def test_uncached_hub_repo_offline_says_how_to_use_a_local_folder(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = nanochat("--source", "hf:nobody/not-a-model", "-p", "hi", env=env)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "hf:nobody/not-a-model" in err and "--source" in err and "Traceback" not in err


def test_without_a_source_the_demo_answers_and_says_how_to_get_a_real_model(tmp_path):
    r = nanochat("-p", "What is 123*45?", "-t", "0", env={"NANOCHAT_MLX_CONFIG_DIR": str(tmp_path / "cfg")})
    assert r.returncode == 0, r.stderr.decode()
    assert "5535" in r.stdout.decode()
    err = r.stderr.decode()
    assert "demo" in err and "nanochat-mlx models" in err and err.count("note:") == 1


def test_the_source_chosen_last_is_the_next_default(tmp_path):
    env = {"NANOCHAT_MLX_CONFIG_DIR": str(tmp_path / "cfg")}
    user, want, max_tokens = reference_reply("g9")
    first = nanochat("--source", str(variant_dir("g9")), "-p", "hi", "-t", "0", "-m", "2", env=env)
    assert first.returncode == 0, first.stderr.decode()
    again = nanochat("-p", user, "-t", "0", "-m", str(max_tokens), env=env)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode() == want + "\n" and "demo" not in again.stderr.decode()


def test_debug_shows_the_traceback(tmp_path):
    r = nanochat("--source", str(tmp_path / "nope"), "-p", "hi", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr.decode()


def test_info_describes_the_checkpoint():
    r = nanochat("info", str(variant_dir("g9")))
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    for needle in (
        "g9",
        "smear_gate.weight",
        "n_layer=4",
        "128, 128, 64, 64",
        "model_000500.pt",
        "tokenizer.pkl",
        "bfloat16",
    ):
        assert needle in out


def test_info_on_ambiguous_generation_says_so():
    out = nanochat("info", str(variant_dir("g6"))).stdout.decode()
    assert "g5" in out and "g6" in out and "--arch" in out


@pytest.mark.parametrize("arch", ["g6", "G6", "6"])
def test_info_with_arch_override(arch):
    out = nanochat("info", str(variant_dir("g6")), "--arch", arch).stdout.decode()
    assert "generation:   g6" in out and "softcap 20" in out


def test_multistep_step_option_loads_the_older_step():
    r = nanochat("info", str(variant_dir("g9-multistep")), "--step", "100")
    assert "step 100" in r.stdout.decode()
    r = nanochat("info", str(variant_dir("g9-multistep")), "--step", "7")
    assert r.returncode == 1 and "step 7" in r.stderr.decode() and "100, 200" in r.stderr.decode()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "nanochat-mlx"
    assert script.exists()
    r = subprocess.run([str(script), "--help"], capture_output=True, timeout=60)
    assert r.returncode == 0 and b"--source" in r.stdout


@pytest.mark.parametrize("spelling", ["--source", "--model", "-i"])
def test_info_takes_the_source_as_an_option_as_the_other_commands(spelling):
    positional = nanochat("info", str(variant_dir("g9")))
    r = nanochat("info", spelling, str(variant_dir("g9")))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == positional.stdout


def test_info_with_two_different_sources_is_refused():
    r = nanochat("info", str(variant_dir("g9")), "--source", "demo")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "two sources" in err


def test_convert_takes_the_source_as_an_option(tmp_path):
    r = nanochat("convert", "--source", str(variant_dir("g1")), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "out" / "config.json").is_file()


def test_info_names_the_backend_and_device():
    out = nanochat("info", str(variant_dir("g1")), "--backend", "mlx").stdout.decode()
    assert "backend:      mlx on cpu, float32 (mlx)" in out


# --- as people type it ----------------------------------------------------------------------------


def test_mlx_lm_spellings_work_as_aliases():
    user, want, max_tokens = reference_reply("g9")
    r = nanochat("--model", str(variant_dir("g9")), "-p", user, "--temp", "0", "-m", str(max_tokens))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == want + "\n"


def test_system_prompt_spelling_is_accepted():
    r = nanochat("--source", str(variant_dir("g1")), "-p", "hi", "-t", "0", "-m", "3", "--system-prompt", "Be brief.")
    assert r.returncode == 0, r.stderr.decode()


def test_reference_chat_cli_spellings_pick_a_base_dir_checkpoint(tmp_path):
    copy_variant("g9", tmp_path / "base" / "chatsft_checkpoints" / "d4")
    user, want, max_tokens = reference_reply("g9")
    env = {"NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    r = nanochat("-i", "sft", "-g", "d4", "-s", "500", "-p", user, "-t", "0", "-m", str(max_tokens), env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == want + "\n"


def test_model_tag_alone_picks_from_the_sft_phase_as_the_reference_chat_cli(tmp_path):
    copy_variant("g9", tmp_path / "base" / "chatsft_checkpoints" / "d4")
    user, want, max_tokens = reference_reply("g9")
    env = {"NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    r = nanochat("-g", "d4", "-p", user, "-t", "0", "-m", str(max_tokens), env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == want + "\n"


@pytest.mark.parametrize("source", [str(variant_dir("g1")), "demo", "hf:owner/name"])
def test_model_tag_with_a_source_outside_the_base_dir_is_refused(source):
    r = nanochat("--source", source, "-g", "d20", "-p", "hi")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1
    assert "-g/--model-tag" in err and "-i base|mid|sft|rl" in err and source in err


def test_model_tag_that_conflicts_with_the_sources_tag_is_refused():
    r = nanochat("--source", "nanochat:sft/d4", "-g", "d6", "-p", "hi")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "conflicts" in err and "d4" in err and "d6" in err


def test_a_bad_option_is_one_line_not_a_usage_dump():
    r = nanochat("--source", str(variant_dir("g1")), "-p", "hi", "--no-such-flag")
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "--no-such-flag" in err and "--help" in err


@pytest.mark.parametrize(
    "command",
    [
        "chat",
        "tui",
        "info",
        "bench",
        "serve",
        "sft",
        "models",
    ],
)
def test_every_command_answers_a_typo_in_one_line_not_a_usage_dump(command):
    r = nanochat(*([] if command == "chat" else [command]), "--jsn")
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "--jsn" in err and "--help)" in err


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_an_empty_prompt_is_refused(prompt):
    r = nanochat("--source", str(variant_dir("g1")), "-p", prompt)
    assert r.returncode == 1 and "empty" in r.stderr.decode() and r.stdout == b""


@pytest.mark.parametrize("args", [["-t", "nan"], ["-t", "inf"], ["--repetition-penalty", "nan"], ["--top-p=-inf"]])
def test_values_that_are_not_finite_numbers_are_refused(args):
    r = nanochat("--source", str(variant_dir("g1")), "-p", "hi", *args)
    err = r.stderr.decode()
    assert r.returncode == 2 and "finite" in err and err.count("\n") == 1


def test_an_empty_source_is_refused_not_the_current_folder():
    r = nanochat("--source", "", "-p", "hi")
    assert r.returncode == 1 and "source is empty" in r.stderr.decode()


def test_version():
    r = nanochat("--version")
    assert r.returncode == 0 and r.stdout.decode().startswith("nanochat-mlx ")


def test_a_pipe_closed_early_ends_quietly():
    cmd = " ".join([*CLI, "--source", str(variant_dir("g9")), "-p", "'hi'", "-t", "1.0", "-m", "400"])
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -c 1"], capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_repl_refuses_a_line_longer_than_the_context_and_goes_on():
    long_line = "word " * 3000
    r = nanochat("--source", str(variant_dir("g1")), "-t", "0", "-m", "4", stdin=f"{long_line}\nhi\n")
    assert r.returncode == 0, r.stderr.decode()
    assert "too long" in r.stderr.decode()
    assert r.stdout.decode().count("\n") == 1  # the next message was answered


@pytest.mark.parametrize("command", ["chat", "tui", "info", "convert"])
def test_every_argument_has_help_text(command):
    from nanochat_mlx.cli import build_parser

    parser = build_parser()[command]
    missing = [a.dest for a in parser._actions if not a.help]
    assert missing == []


def test_bench_help_is_plain_text_with_help_for_every_argument():
    r = nanochat("bench", "--help")
    assert r.returncode == 0 and "``" not in r.stdout.decode()
    from nanochat_mlx.bench import parser

    assert [a.dest for a in parser()._actions if not a.help] == []


def test_a_reply_that_fills_the_context_says_so_on_stderr():
    r = nanochat("--source", str(variant_dir("g1")), "-p", "-", "-t", "0", stdin="a b " * 290)  # 640-token context
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.strip()
    assert "note: the reply stopped at the end of the model's context (640 tokens)" in r.stderr.decode()


def test_a_reply_cut_by_max_tokens_gets_no_context_note():
    r = nanochat("--source", str(variant_dir("g1")), "-p", "hi", "-t", "0", "-m", "3")
    assert r.returncode == 0 and "context" not in r.stderr.decode()
