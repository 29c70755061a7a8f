"""Running the project's scripts the way a user does, for the tests that check their command lines."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(script, *args, timeout=300, **env):
    """Run `python script args...` from the repository root (script may be "-m"); the
    CompletedProcess, text output. Keyword arguments are extra environment variables."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_start(script, *args):
    """Start `python script args...` in the background, output discarded: a Popen to wait on or kill."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
