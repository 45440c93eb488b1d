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
  Storage errors on a URL (gs://... unreachable: no network, no credentials, no
  such bucket) end in one line too, naming the flag that gave the URL.
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

  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:
      message = storage_error(e, sys.argv)
      if message is None:
        raise
      fail(message)
  app.run(guarded, flags_parser=parse)


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+")


def storage_error(e: BaseException, argv) -> str | None:
  """One line for a TensorFlow file-system error on a URL (tf.io.gfile, which orbax and
  tf.data use for gs://), naming the flag whose value it is under; None for others."""
  if not any(t.__name__ == "OpError" and t.__module__.startswith("tensorflow")
             for t in type(e).__mro__):
    return None
  text = " ".join(str(getattr(e, "message", e)).split())
  url = _URL.search(text)
  if url is None:
    return None
  url = url.group(0).rstrip(".,;:)")
  detail = text.split("error details: ")[-1].split(" when ")[0].strip()
  given = [a for a in argv if a.startswith("--") and "=" in a
           and "://" in a and url.startswith(a.split("=", 1)[1].rstrip("/"))]
  where = f"{given[-1]}: " if given else ""
  return (f"{where}cannot access {url} ({type(e).__name__}: {detail}); check the network, "
          "the bucket name and the credentials (gcloud auth application-default login), "
          "or use a local path.")


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
  if isinstance(e, AttributeError) and "get_config" in str(e):   # e.g. an empty file
    return (f"{_arg(argv, '--config=')}: the file defines no get_config(); a config file "
            "defines get_config(preset) returning the config, e.g. "
            "--config=configs/detcon_b.py:demo.")
  if (isinstance(e, (KeyError, AttributeError))                # --config.<key> that the
      or re.match(r"Unknown command line flag 'config\.", first)):   # config lacks
    return _unknown_key(e, argv)
  if isinstance(e, OSError) and "No such file" in str(e):
    return (f"{_arg(argv, '--config=')}: no such config file (paths are relative to the "
            "current directory), e.g. --config=configs/detcon_b.py:demo.")
  return first


def _overrides(argv) -> list[str]:
  """The --config.a.b=v arguments (--noconfig.a.b too), in order."""
  return [a for a in argv if a.startswith(("--config.", "--noconfig."))]


def _key_path(arg: str) -> list[str]:
  """'--config.a.b=v' -> ['config', 'a', 'b']."""
  return arg.split("=")[0].lstrip("-").removeprefix("no").split(".")


def _first_unknown(config, argv):
  """(argument, unknown path, hint) for the first override whose key the config lacks,
  walking the loaded config (the exception's text does not say which argument)."""
  for arg in _overrides(argv):
    node, path = config, _key_path(arg)
    for i, part in enumerate(path[1:], start=1):
      if not hasattr(node, "keys"):
        return arg, ".".join(path), f" ({'.'.join(path[:i])} is a value, not a section)"
      if part not in node.keys():
        close = difflib.get_close_matches(part, list(node.keys()), n=3)
        hint = (f" (did you mean {', '.join(close)}?)" if close
                else f" (keys there: {sorted(node.keys())})")
        return arg, ".".join(path[:i + 1]), hint
      node = node[part]
  return None


def _unknown_key(e, argv) -> str:
  """--config.a.b=v where the config has no a.b: name the argument, and the nearest keys."""
  found = None
  try:
    found = _first_unknown(_load_config(argv), argv)
  except Exception:   # the config does not load: name what the exception names
    pass
  if found is None:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    missing = re.findall(r"'(?:config\.)?([^'\s]+)'", text)
    name = missing[0].split(".")[-1] if missing else ""
    overrides = _overrides(argv)
    arg = next((a for a in overrides if name in _key_path(a)[1:]),
               overrides[0] if overrides else "--config")
    found = arg, ".".join(_key_path(arg)), ""
  arg, path, hint = found
  return (f"{arg}: {path} is not a config key{hint}; the keys and their defaults are in "
          "configs/common.py.")
