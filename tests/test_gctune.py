"""mta.gctune: the collector settings every daemon process starts with."""
from __future__ import annotations

import subprocess
import sys

from mta import gctune


def test_settle_freezes_the_start_up_heap_and_raises_the_young_threshold():
    # In a fresh interpreter: the test run's own collector state is left alone.
    code = ("import gc\n"
            "from mta import gctune\n"
            "before = gc.get_threshold()\n"
            "gctune.settle()\n"
            "after = gc.get_threshold()\n"
            "print(gc.get_freeze_count() > 0, after[0], after[1:] == before[1:])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", str(gctune.YOUNG_THRESHOLD), "True"]


def test_the_daemon_settles_the_collector_when_its_tree_starts_not_when_built(tmp_path):
    code = ("import gc\n"
            "from twisted.internet import defer, reactor\n"
            "from mta import gctune\n"
            "from mta.tap import Options, makeService\n"
            "o = Options()\n"
            f"o.parseOptions(['--config', {str(tmp_path / 'mta.toml')!r}])\n"
            "top = makeService(o)\n"
            "print(gc.get_freeze_count() > 0, gc.get_threshold()[0] == gctune.YOUNG_THRESHOLD, "
            "'doIteration' in vars(reactor))\n"
            "def run():\n"
            "    top.privilegedStartService()\n"
            "    top.startService()\n"
            "    print(gc.get_freeze_count() > 0, gc.get_threshold()[0], "
            "'doIteration' in vars(reactor))\n"
            "    defer.maybeDeferred(top.stopService).addBoth(lambda _: reactor.stop())\n"
            "reactor.callWhenRunning(run)\n"
            "reactor.run()\n")
    (tmp_path / "mta.toml").write_text(
        "[server]\nlisten = ['tcp:0:interface=127.0.0.1']\nhostname = 'mx.test'\n"
        f"[spool]\nurl = 'sqlite:///{tmp_path / 'spool.sqlite'}'\n"
        "[relay]\ndeliver = false\n"
        "[dns]\nnameservers = ['127.0.0.1:9']\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # Built: nothing of the process changed (tests build trees too); started:
    # the heap frozen, the threshold raised, the reactor's poll streamlined.
    assert out.stdout.split("\n")[:2] == ["False False False",
                                          f"True {gctune.YOUNG_THRESHOLD} True"]
