# Sourced by gdb (see run.sh): a breakpoint on every function of the broker library's files,
# enabled at the first request. Records, in order, the file and function of every entry from the
# start of request 1 (Engine::answer_now) to the start of request 3, with the thread it ran on,
# into $TRACE_OUT as [request 1 entries, request 2 entries]. Start-up is not traced (too slow).
import gdb, re, os, json
SKIP = ("src/devprovider.rs", "src/demo.rs", "src/main.rs")
out = os.environ["TRACE_OUT"]
state = {"requests": 0, "events": [[], [], []]}

class Probe(gdb.Breakpoint):
    def __init__(self, spec, file, func, start=False):
        super().__init__(spec, internal=True)
        self.file, self.func, self.start = file, func, start
    def stop(self):
        if self.start:
            state["requests"] += 1
            if state["requests"] == 1:
                for probe in probes:
                    probe.enabled = True
            with open(out, "w") as f:
                json.dump(state["events"][1:3], f)
        n = state["requests"]
        if 1 <= n <= 2:
            state["events"][n].append((self.file, self.func, gdb.selected_thread().num))
        return False

text = gdb.execute("info functions ^extauth_broker::", to_string=True)
file = None
probes = []
for line in text.splitlines():
    m = re.match(r"File (.*):$", line)
    if m:
        file = m.group(1)
        continue
    m = re.match(r"(\d+):\s+(?:static )?(.*);$", line.strip())
    if not (m and file and "/protocol/" not in file and file.startswith("src/")) or file in SKIP:
        continue
    name = m.group(2)
    sym = re.search(r"(extauth_broker::\S+?)(\(|<|$)", name)
    func = sym.group(1) if sym else name
    is_start = func.endswith("Engine::answer_now")
    try:
        probe = Probe(f"{file}:{m.group(1)}", file, func, is_start)
        probe.enabled = is_start
        probes.append(probe)
    except gdb.error:
        pass
print(f"probes: {len(probes)}")
