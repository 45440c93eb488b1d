"""What the command lines (train, evaluate, export) share: every mistake a user can
make on them ends in one `error:` line naming the flag, key, file or path, with
exit status 1 and no traceback; and library INFO logs (orbax, jax) stay quiet.
"""
from __future__ import annotations

import difflib
import re
import sys

from absl import app, flags, logging


def fail(message) -> None:
  """Exit with status 1 after one `error:` line (newlines in message folded)."""
  sys.exit("error: " + " ".join(str(message).split()))


def run(main, config_flag=None, positional: bool = False) -> None:
  """absl's app.run, with command-line mistakes as one `error:` line.

  config_flag: the DEFINE_config_file holder, if any; its file is loaded here
  (ml_collections loads it lazily), so that a missing file fails here too.
  positional: main takes arguments besides flags (argv[1:]; compare's roots).
  """
  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
      if config_flag is not None:
        config_flag.value.keys()   # loads the config file
    except Exception as e:   # flags.Error, KeyError/AttributeError, OSError, ConfigError...
      fail(describe(e, argv))
    if len(rest) > 1 and not positional:
      fail(f"unexpected arguments {rest[1:]}; every option is a --flag=value.")
    if not flags.FLAGS["verbosity"].present:   # orbax/jax INFO lines drown the output
      logging.set_verbosity(logging.WARNING)
    return rest
  app.run(main, flags_parser=parse)


def _chain(e):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _arg(argv, prefix: str) -> str:
  """The last argument starting with prefix (the one absl keeps)."""
  return next((a for a in reversed(argv) if a.startswith(prefix)), prefix.rstrip("="))


def _load_config(argv):
  """The config that --config=FILE[:ARG] names, loaded as config_flags does."""
  import importlib.util
  path, _, arg = _arg(argv, "--config=")[len("--config="):].partition(":")
  spec = importlib.util.spec_from_file_location("cli_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def describe(e: BaseException, argv) -> str:
  """One line for an error raised while parsing argv."""
  config_errors = [c for c in _chain(e) if type(c).__name__ == "ConfigError"]
  if config_errors:                      # raised by get_config (e.g. an unknown preset)
    return f"{_arg(argv, '--config=')}: {config_errors[-1]}"
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  if (isinstance(e, (KeyError, AttributeError))                # --config.<key> that the
      or re.match(r"Unknown command line flag 'config\.", first)):   # config lacks
    return _unknown_key(e, argv)
  if isinstance(e, OSError) and "No such file" in str(e):
    return (f"{_arg(argv, '--config=')}: no such config file (paths are relative to the "
            "current directory), e.g. --config=configs/detcon_b.py:demo.")
  return first


def _unknown_key(e, argv) -> str:
  """--config.a.b=v where the config has no a.b: name the argument, and the nearest keys."""
  missing = re.findall(r"'(?:config\.)?([^']+)'", str(e))
  name = missing[0].split(".")[-1] if missing else ""
  overrides = [a for a in argv if a.startswith("--config.")]
  arg = next((a for a in overrides if name in a.split("=")[0].split(".")[1:]),
             overrides[0] if overrides else "--config")
  path = arg.split("=")[0][len("--"):]
  hint = ""
  try:
    node = _load_config(argv)
    for part in path.split(".")[1:-1]:
      node = node[part]
    close = difflib.get_close_matches(path.split(".")[-1], list(node.keys()), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else f" (keys there: {sorted(node)})"
  except Exception:   # the config does not load, or the path runs through a leaf
    pass
  return (f"{arg}: {path} is not a config key{hint}; the keys and their defaults are in "
          "configs/common.py.")
