"""Every `python -m mlm_vs_clm.X ...` command in README.md and docs/*.md parses: the module
exists, each flag is one it defines, config files load and every `--config.KEY=VALUE`
override names a real key. (What the commands do is tested elsewhere; this catches docs
that drift from the code.) And the demo, the README's first command, says what it ran."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDERS = {"SUITE": "news", "PRESET": "tiny", "SIZE": "tiny", "NAME": "micro"}
# Runs the module as `python -m` would, with absl's app.run replaced by "parse the flags and stop".
PARSE = """
import runpy, sys
from absl import app, flags

def parse_only(main, argv=None, flags_parser=None):
    rest = flags.FLAGS(sys.argv)
    print("parsed", rest[1:])
    sys.exit(0)

app.run = parse_only
module = sys.argv[1]
sys.argv = ["prog", *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _commands():
    out = []
    for path in [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for m in re.finditer(r"python -m (mlm_vs_clm(?:\.[a-z_]+)+)([^`\n#]*)", text):
            module, args = m.group(1), m.group(2).strip()
            name = module.split(".", 1)[1]
            argv = [a for a in shlex.split(args.split("(")[0] if args.count("'") % 2 else args)
                    if not a.startswith(("[", "..."))]
            argv = [a for a in argv if a not in ("|", "&&")]
            for placeholder, example in PLACEHOLDERS.items():  # templates such as configs/finetune.py:SUITE
                argv = [re.sub(rf"\b{placeholder}\b", example, a) for a in argv]
            out.append(pytest.param(module, argv, id=f"{os.path.basename(path)}:{name}:{len(out)}"))
    return out


COMMANDS = _commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("module,argv", COMMANDS)
def test_documented_command_parses(module, argv):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", PARSE, module, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "parsed" in proc.stdout, f"{module} {' '.join(argv)}\n{proc.stderr[-1500:]}"


def test_demo_closing_text_names_what_was_trained_and_exported(tmp_path):
    from mlm_vs_clm import (
        demo,
        train,  # noqa: F401 - its flags first: importing the demo must define none
    )

    assert demo.describe_schedule("clm50_mlm40", 30, 0.4) == "CLM for 15 steps, then MLM-40 for 15 steps"
    assert demo.describe_schedule("clm", 30, 0.4) == "CLM for 30 steps"
    assert demo.describe_schedule("mlm", 30, 0.3) == "MLM-30 for 30 steps"
    for causal, loader in ((True, "LlamaForCausalLM"), (False, "AutoModelForMaskedLM")):
        (tmp_path / "config.json").write_text(json.dumps({"is_causal": causal}))
        assert demo.hf_loader(str(tmp_path)).startswith(loader)
