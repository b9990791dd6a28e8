"""The command line as a user runs it (subprocesses, like the README)."""

import subprocess
import sys

import numpy as np


def run(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_user_error(args, *needles):
    code, out, err = run(*args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("torchax-bridge: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_checkpoint_path():
    assert_user_error(["forward", "--checkpoint", "/no/such/model", "--input-ids", "1,2"], "/no/such/model", "not found")


def test_prompt_that_tokenizes_to_nothing():
    assert_user_error(["forward", "--prompt", "", "--devices", "1"], "no tokens")


def test_zero_devices():
    assert_user_error(["forward", "--checkpoint", "tiny-llama", "--input-ids", "1,2", "--devices", "0"], "--devices")


def test_unknown_scheme():
    assert_user_error(["forward", "--checkpoint", "tiny-llama", "--input-ids", "1", "--scheme", "nope"], "nope", "tp")


def test_smollm2_tp8_without_fallback_names_the_head_problem():
    assert_user_error(["forward", "--prompt", "hi", "--devices", "8", "--scheme", "tp"], "heads", "3")


def test_forward_prints_top5_and_saves_logits(tmp_path):
    out_file = tmp_path / "logits.npy"
    code, out, err = run("forward", "--checkpoint", "tiny-llama", "--input-ids", "1,2,3,4", "--devices", "8",
                         "--scheme", "tp", "--save-logits", str(out_file))  # fmt: skip
    assert code == 0, err
    assert "logits shape [1, 4, 256]" in out and "top-5" in out and "warm call" in out
    assert np.load(out_file).shape == (1, 4, 256)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_readme_main_command_answers_paris():
    """The README's main job: SmolLM2, chat template, 8 devices, tensor parallel."""
    code, out, err = run("generate", "--chat", "--prompt", "What is the capital of France?", "--devices", "8",
                         "--scheme", "tp", "--fallback", "replicate", "--max-new-tokens", "32")  # fmt: skip
    assert code == 0, err
    assert "Paris" in out
    assert "mesh {'model': 8} scheme tp" in err
