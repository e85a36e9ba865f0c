"""Real VMs driven from Python."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import machinen
from machinen import ErrorCode


def test_exec_streams_output_and_reports_exit_codes(vm: machinen.Vm) -> None:
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    assert vm.exec("printf %s $X", env={"X": "42"}).text == "42"
    assert vm.exec("pwd", cwd="/tmp").text.strip() == "/tmp"
    got: list[bytes] = []
    r = vm.exec("for i in 1 2 3; do echo $i; sleep 0.2; done", on_stdout=got.append)
    assert b"".join(got) == b"1\n2\n3\n" and r.ok
    with vm.exec_stream("echo a; echo b >&2; exit 7") as s:
        chunks = list(s)
    assert {c.stream for c in chunks} == {"stdout", "stderr"}
    assert s.result is not None and s.result.exit_code == 7
    with pytest.raises(machinen.ExecError) as e:
        vm.exec("exit 9", check=True)
    assert e.value.code == ErrorCode.EXEC_NONZERO_EXIT
    with pytest.raises(machinen.ExecError) as nf:
        vm.exec(["/no/such/program"])
    assert nf.value.code == ErrorCode.EXEC_COMMAND_NOT_FOUND
    with pytest.raises(machinen.MachinenError) as t:
        vm.exec("sleep 30", timeout=1)
    assert t.value.code == ErrorCode.EXEC_TIMEOUT


def test_a_pty_session_is_a_terminal(vm: machinen.Vm) -> None:
    pty = vm.exec_pty(["sh", "-c", "stty size; test -t 0 && echo tty; read line; echo got:$line"],
                      rows=33, cols=101)
    assert pty.pid > 0
    pty.write("hello\n")
    out = pty.read_all().replace(b"\r", b"")
    assert b"33 101\n" in out and b"tty\n" in out and b"got:hello" in out, out
    assert pty.exit_code == 0


def test_memory_stats_and_the_balloon(vm: machinen.Vm) -> None:
    stats = vm.memory_stats()
    assert stats["ceiling_bytes"] == 256 << 20 and stats["guest"]["total_bytes"] > 0
    r = vm.set_balloon(200 << 20, wait=60)
    assert r["target_bytes"] == 200 << 20, r
    assert vm.balloon()["target_bytes"] == 200 << 20
    vm.set_balloon(256 << 20, wait=60)
    with pytest.raises(machinen.MachinenError) as e:
        vm.set_balloon(1 << 20)
    assert e.value.code == ErrorCode.BALLOON_TARGET_INVALID


def test_binary_files_round_trip(vm: machinen.Vm) -> None:
    data = bytes(range(256)) * 4096
    assert vm.write_file("/root/py/blob.bin", data) == len(data)
    assert vm.read_file("/root/py/blob.bin") == data
    assert vm.exec("sha256sum /root/py/blob.bin").text.split()[0] == __import__("hashlib").sha256(data).hexdigest()
    vm.write_file("/root/py/t.txt", "héllo\n")
    vm.write_file("/root/py/t.txt", "more\n", append=True)
    assert vm.read_text("/root/py/t.txt") == "héllo\nmore\n"
    with pytest.raises(machinen.FilesError) as e:
        vm.read_file("/root/py/missing")
    assert e.value.code == ErrorCode.FILES_NOT_FOUND


def test_directory_trees_go_both_ways(vm: machinen.Vm, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_text("deep\n")
    (src / "skip.log").write_text("no\n")
    entries, _ = vm.push_dir(src, "/root/tree", exclude=["*.log"])
    assert entries >= 3
    assert vm.exec("cat /root/tree/a/b/f.txt; ls /root/tree").text == "deep\na\n"
    back = tmp_path / "back"
    vm.pull_dir("/root/tree", back)
    assert (back / "a" / "b" / "f.txt").read_text() == "deep\n"


def test_a_captured_process_is_checked_and_refusals_carry_the_image_codes(
        vm: machinen.Vm, tmp_path: Path) -> None:
    pid = int(vm.exec("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").text.strip())
    for _ in range(200):
        if vm.exec(f"tr '\\0' ' ' < /proc/{pid}/cmdline").text.startswith("sleep 600"):
            break
        time.sleep(0.1)
    c = vm.capture_process(pid, tmp_path / "sleep.img")
    assert c["threads"] == 1 and c["memory_bytes"] > 4096
    assert c["plan"]["refusals"] == []
    assert c["plan"]["steps"][-1]["action"] == "resume-wait"
    assert machinen.check_process_image(tmp_path / "sleep.img")["refusals"] == []
    arm = machinen.check_process_image(tmp_path / "sleep.img", target_arch="arm64")
    assert arm["refusals"][0]["code"] == "architecture-pair-unsupported"
    with pytest.raises(machinen.MachinenError) as e:
        machinen.check_process_image(tmp_path)
    assert e.value.code == machinen.ErrorCode.PORTABLE_IMAGE_INVALID
    with pytest.raises(machinen.MachinenError) as e:
        vm.capture_process(1, tmp_path / "agent.img")
    assert e.value.code == machinen.ErrorCode.SNAPSHOT_PORTABLE_UNSUPPORTED
    assert vm.capture_process(pid, tmp_path / "killed.img", kill=True)["killed"] is True


def test_criu_dumps_and_restores_a_process_in_the_guest(vm: machinen.Vm) -> None:
    assert "Looks good" in vm.criu(["check"])["stdout"]
    pid = str(
        int(
            vm.exec(
                "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/py-count; sleep 0.2; done'"
                " </dev/null >/dev/null 2>&1 & echo $!"
            ).stdout.strip()
        )
    )

    def count() -> int:
        return int(vm.exec("cat /tmp/py-count 2>/dev/null || echo 0").stdout.strip() or 0)

    deadline = time.time() + 30
    while count() < 10:
        assert time.time() < deadline, "the count did not reach 10"
        time.sleep(0.2)
    vm.exec("rm -rf /var/tmp/py-ck && mkdir -p /var/tmp/py-ck", check=True)
    dump = vm.criu(["dump", "-t", pid, "-D", "/var/tmp/py-ck"])
    assert dump["exit_code"] == 0, dump["stderr"]
    at = count()
    vm.exec("echo 0 > /tmp/py-count", check=True)
    restore = vm.criu(["restore", "-D", "/var/tmp/py-ck", "-d"])
    assert restore["exit_code"] == 0, restore["stderr"]
    deadline = time.time() + 30
    while count() <= at:
        assert time.time() < deadline, "the restored count did not go on"
        time.sleep(0.2)
    vm.exec(f"kill {pid}; rm -rf /var/tmp/py-ck /tmp/py-count")
    assert vm.criu(["dump", "-t", "999999", "-D", "/var/tmp"])["exit_code"] == 1
    with pytest.raises(TypeError):
        vm.criu("check")


def test_mounts_copy_a_host_directory_in(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("from the host\n")
    with machinen.boot(name="py-mounts", memory_mib=256, mounts=[f"{tmp_path}:/work"]) as v:
        assert v.read_text("/work/hello.txt") == "from the host\n"
        v.exec("echo changed > /work/hello.txt", check=True)
    assert (tmp_path / "hello.txt").read_text() == "from the host\n"
    with pytest.raises(machinen.MachinenError) as e:
        machinen.boot(mounts=["no-colon"])
    assert e.value.code.value.startswith("BOOT_MOUNT") or e.value.code.value.startswith("MOUNT_")


def test_the_cli_sees_python_vms_and_python_attaches_to_them(vm: machinen.Vm) -> None:
    names = [v["name"] for v in machinen.list_vms()]
    assert vm.name in names
    cli = os.environ.get("MN_TEST_CLI")
    if cli:
        out = subprocess.run([cli, "ls", "--json"], capture_output=True, text=True, check=True)
        assert vm.name in out.stdout
    again = machinen.attach(vm.name)
    assert again.exec("echo via-attach").text == "via-attach\n"
    if cli:
        # And the other way: a VM the CLI booted, driven from Python.
        subprocess.run([cli, "boot", "--name", "py-from-cli", "--memory", "256", "--detached"],
                       check=True, capture_output=True)
        theirs = machinen.attach("py-from-cli")
        assert theirs.exec("echo driven-from-python").text == "driven-from-python\n"
        theirs.kill()
        assert "py-from-cli" not in [v["name"] for v in machinen.list_vms()]


def test_concurrent_execs_from_threads_and_asyncio(vm: machinen.Vm) -> None:
    # Each command prints when it started and ended, by the guest's clock:
    # they ran at once if every one started before any ended.
    span = "date +%s.%N; sleep 2; date +%s.%N"

    def overlapped(outs: list[str]) -> bool:
        spans = [tuple(float(x) for x in o.split()) for o in outs]
        return max(a for a, _ in spans) < min(b for _, b in spans)

    results: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        out = vm.exec(span, check=True).text
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and overlapped(results), results

    async def main() -> list[str]:
        a = await machinen.attach_async(vm.name)
        outs = await asyncio.gather(*(a.exec(span, check=True) for _ in range(20)))
        return [o.text for o in outs]

    outs = asyncio.run(main())
    assert len(outs) == 20 and overlapped(outs), outs


def test_ctrl_c_during_a_long_exec_leaves_nothing_behind() -> None:
    name = "py-interrupt"
    with pytest.raises(KeyboardInterrupt):
        with machinen.boot(name=name, memory_mib=256) as v:
            probe = machinen.attach(name)
            timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
            timer.start()
            try:
                v.exec("sleep 600; echo never")
            finally:
                timer.cancel()
                # The guest ended the command when its stream closed.
                deadline = time.monotonic() + 20
                while probe.exec("pgrep -x sleep || true").text.strip():
                    assert time.monotonic() < deadline, "sleep still runs in the guest"
                    time.sleep(0.2)
    assert name not in [x["name"] for x in machinen.list_vms()]


def test_snapshot_restore_and_fork_of_the_counter(tmp_path: Path) -> None:
    # The count is renamed into place so that a read (or a dump) never
    # meets the file truncated and not yet written.
    counter = ("i=0; while true; do i=$((i+1)); echo $i > /root/count.new;"
               " mv /root/count.new /root/count; sleep 0.2; done")
    with machinen.boot(name="py-counter", memory_mib=256, cmd=counter) as src:
        def count(v: machinen.Vm) -> int:
            try:
                return int(v.read_text("/root/count").strip() or 0)
            except machinen.FilesError:
                return 0  # not written yet

        deadline = time.monotonic() + 30
        while count(src) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        bundle = tmp_path / "counter.snap"
        # Read before: the source runs on while the call finishes (the
        # bundle is hashed and synced after the guest resumes), so a count
        # read after it may be well past the snapshot's.
        before = count(src)
        report = src.snapshot(bundle)
        assert (bundle / "meta.json").is_file(), report
        with machinen.restore(bundle, name="py-counter-2") as back:
            first = count(back)
            assert first >= before >= 5, (first, before)
            time.sleep(1.0)
            assert count(back) > first, "the restored counter goes on"
            with back.fork(name="py-counter-3") as sibling:
                a, b = count(back), count(sibling)
                assert abs(a - b) < 20
                sibling.exec("echo fork-only > /root/mine")
                assert back.exec("cat /root/mine 2>/dev/null || echo none").text == "none\n"
        # A bundle directory that exists already is refused, by code.
        with pytest.raises(machinen.SnapshotError) as e:
            src.snapshot(bundle)
        assert e.value.code.value.startswith("SNAPSHOT_"), e.value


def test_criu_engine_moves_the_counter_into_a_vm_of_another_shape(tmp_path: Path) -> None:
    # The count is renamed into place so that a read (or a dump) never
    # meets the file truncated and not yet written.
    counter = ("i=0; while true; do i=$((i+1)); echo $i > /root/count.new;"
               " mv /root/count.new /root/count; sleep 0.2; done")
    src = machinen.boot(name="py-criu-src", memory_mib=512, cpu_model="Nehalem", cmd=counter)
    try:
        def count(v: machinen.Vm) -> int:
            try:
                return int(v.read_text("/root/count").strip() or 0)
            except machinen.FilesError:
                return 0  # not written yet

        deadline = time.monotonic() + 60
        while count(src) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        bundle = tmp_path / "counter.criu"
        with pytest.raises(ValueError):
            src.snapshot(bundle, engine="bogus")
        with pytest.raises(ValueError):
            src.snapshot(bundle, pid=5)
        with pytest.raises(machinen.MachinenError) as p:
            src.snapshot(bundle, engine="portable")
        assert p.value.code == ErrorCode.SNAPSHOT_PORTABLE_UNSUPPORTED
        report = src.snapshot(bundle, engine="criu")
        assert report["engine"] == "criu" and report["pid"] > 1, report
        assert (bundle / "img" / "inventory.img").is_file()
        with machinen.restore(bundle, name="py-criu-dst", memory_mib=768, cpus=2,
                              cpu_model="max") as back:
            assert back.exec("nproc").text.strip() == "2"
            assert "Nehalem" not in back.exec("grep -m1 'model name' /proc/cpuinfo").text
            first = count(back)
            assert first >= 5, (first, back.exec("ls -la /root; cat /root/count*; ps -ef").text)
            deadline = time.monotonic() + 30
            while count(back) <= first + 3:
                assert time.monotonic() < deadline, "the moved counter goes on"
                time.sleep(0.2)
    finally:
        try:
            src.kill()
        except machinen.MachinenError:
            pass  # stopped by the snapshot


def test_provision_bakes_an_image_that_boots_with_its_steps_done(tmp_path: Path) -> None:
    image = tmp_path / "baked.tar.gz"
    r = machinen.provision(image, run=["echo baked > /etc/baked", "mkdir -p /srv/app"],
                           env={"GREETING": "hi"}, cwd="/srv/app")
    assert r["path"] == str(image) and image.is_file() and r["config"]["env"] == {"GREETING": "hi"}
    with machinen.boot(str(image), memory_mib=256) as v:
        assert v.read_text("/etc/baked") == "baked\n"
    with pytest.raises(machinen.MachinenError) as e:
        machinen.provision(tmp_path / "bad.tar.gz", run=["echo nope >&2; exit 4"])
    assert e.value.code == ErrorCode.PROVISION_STEP_FAILED and "nope" in e.value.message


def test_build_bakes_a_dockerfile_and_inspect_shows_its_settings(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.sh").write_text('echo "hello from $(pwd) as $MODE"\n')
    (tmp_path / "Dockerfile").write_text(
        "FROM machinen:base\nENV MODE=prod\nWORKDIR /srv\nCOPY app/ ./\nARG WHO=py\n"
        "RUN echo $WHO > who\nEXPOSE 53/udp\nLABEL team=py\nCMD [\"sh\", \"hello.sh\"]\n"
    )
    image = tmp_path / "built.tar.gz"
    # no_cache: an earlier run of this test left the same build in the cache.
    r = machinen.build(tmp_path, out=image, build_args={"WHO": "python"}, network="none", no_cache=True)
    assert r["cached"] is False and r["steps"] == 3 and image.is_file()
    assert r["config"]["exposed_ports"] == ["53/udp"] and r["config"]["labels"] == {"team": "py"}
    assert machinen.build(tmp_path, out=tmp_path / "again.tar.gz", build_args={"WHO": "python"})["cached"] is True
    info = machinen.inspect_image(image)
    assert info["config"]["cwd"] == "/srv" and info["config"]["cmd"] == ["sh", "hello.sh"]
    with machinen.boot(str(image), memory_mib=256) as v:
        assert v.read_text("/srv/who") == "python\n"
        out = v.exec(info["config"]["cmd"], env=info["config"]["env"], cwd=info["config"]["cwd"])
        assert out.stdout == b"hello from /srv as prod\n"
    (tmp_path / "Bad").write_text("FROM machinen:base\nSTOPSIGNAL SIGINT\n")
    with pytest.raises(machinen.MachinenError) as e:
        machinen.build(tmp_path, out=image, dockerfile=tmp_path / "Bad")
    assert e.value.code == ErrorCode.BUILD_INSTRUCTION_UNSUPPORTED and "line 2" in e.value.message


def test_async_boot_and_context_manager() -> None:
    async def main() -> str:
        async with await machinen.boot_async(name="py-async", memory_mib=256) as v:
            await v.write_file("/root/a", b"async\n")
            return (await v.read_file("/root/a")).decode()

    assert asyncio.run(main()) == "async\n"
    assert "py-async" not in [x["name"] for x in machinen.list_vms()]


def test_the_run_code_example_rolls_a_failed_step_back() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "examples" / "python" / "run_code.py"
    spec = importlib.util.spec_from_file_location("run_code", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with mod.Sandbox(memory_mib=256) as box:
        assert box.run_code("echo state=1 > /root/state; cat /root/state") == "state=1\n"
        assert box.run_code("rm -f /root/state; exit 1").startswith("error (the sandbox was rolled back)")
        assert box.run_code("cat /root/state") == "state=1\n"
        assert box.log == ["step 1: ok", "step 2: rolled back", "step 3: ok"]
