#!/usr/bin/python3
"""A fake ``nvidia-smi`` for GPU-less test rigs (stdlib only, Python >= 3.7).

Installed into Tier B rigs as /usr/bin/nvidia-smi. Mimics the real tool's output formats,
messages and exit codes for the subset llama-rig uses (see tests/rigs/INSTALL's neighbours and
/work/shared/reference/rigs.md "nvidia-smi (real formats)").

Config  ($FAKE_NVIDIA_SMI_CONFIG, default /etc/fake-nvidia-smi/gpus.json), read on every call:
  either a JSON list of GPU dicts, or an object
  {"gpus": [...], "driver_loaded": true, "driver_version": "570.133.20", "cuda_version": "12.8",
   "power_draw": 280.5, "processes": [{"gpu": 0, "pid": 123, "process_name": "llama-server",
   "used_memory": 20000}]}
  Missing file -> 6 x NVIDIA GeForce RTX 3090. Every GPU dict key is optional:
  name, uuid, pci_bus_id, compute_cap, memory_total (MiB), memory_used (MiB), memory_reserved
  (MiB, subtracted from free), power_min, power_max, power_default, power_draw (W; reported
  as min(power_draw, the current power limit), as a board's firmware holds it),
  power_limit_supported (bool), temperature (C), utilization (%), fan (%), pstate.
State   ($FAKE_NVIDIA_SMI_STATE, default /run/fake-nvidia-smi/state.json): persistence mode and
  power limit per GPU (keyed by UUID). /run is tmpfs, so a reboot - or deleting the file - resets
  everything to the defaults (persistence Disabled, limit = default limit).
"""
import fcntl
import json
import os
import sys
import time
import uuid as uuidlib

CONFIG_PATH = os.environ.get("FAKE_NVIDIA_SMI_CONFIG", "/etc/fake-nvidia-smi/gpus.json")
STATE_PATH = os.environ.get("FAKE_NVIDIA_SMI_STATE", "/run/fake-nvidia-smi/state.json")

DEFAULT_DRIVER = "570.133.20"
DEFAULT_CUDA = "12.8"
DEFAULT_COUNT = 6

# exit codes documented by nvidia-smi(1)
OK, INVALID_ARG, NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND, NO_DRIVER, OTHER = 0, 2, 3, 4, 6, 9, 255

NO_DRIVER_MSG = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                 "Make sure that the latest NVIDIA driver is installed and running.\n")
BAD_ARGS_MSG = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n"


class Exit(Exception):
    def __init__(self, code, out="", err=""):
        super().__init__(code)
        self.code, self.out, self.err = code, out, err


# ------------------------------------------------------------------------------------------
# config / state
# ------------------------------------------------------------------------------------------

def _default_gpu(i):
    return {
        "name": "NVIDIA GeForce RTX 3090",
        "uuid": "GPU-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "fake-nvidia-smi/%d" % i)),
        "pci_bus_id": "00000000:%02X:00.0" % (i + 1),
        "compute_cap": "8.6",
        "memory_total": 24576,
        "memory_used": 1,
        "memory_reserved": 0,
        "power_min": 100.0,
        "power_max": 350.0,
        "power_default": 350.0,
        "power_draw": round(21.83 + (i * 1.37) % 8, 2),  # stable idle draw, 20-30 W
        "power_limit_supported": True,
        "temperature": 33 + (i * 3) % 9,
        "utilization": 0,
        "fan": 0,
        "pstate": "P8",
    }


_ALIASES = {
    "pci.bus_id": "pci_bus_id", "bus_id": "pci_bus_id", "memory_total_mib": "memory_total",
    "memory_used_mib": "memory_used", "power_min_limit": "power_min",
    "power_max_limit": "power_max", "power_default_limit": "power_default",
    "temperature_gpu": "temperature", "utilization_gpu": "utilization",
}


def load_config():
    cfg = {}
    try:
        with open(CONFIG_PATH) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        cfg = {}
    if isinstance(cfg, list):
        cfg = {"gpus": cfg}
    raw = cfg.get("gpus")
    if raw is None:
        raw = [{} for _ in range(DEFAULT_COUNT)]
    gpus = []
    for i, g in enumerate(raw):
        d = _default_gpu(i)
        for k, v in (g or {}).items():
            d[_ALIASES.get(k, k)] = v
        if "power_draw" in cfg and "power_draw" not in (g or {}):
            d["power_draw"] = cfg["power_draw"]
        if "power_default" not in (g or {}) and "power_max" in (g or {}):
            d["power_default"] = d["power_max"]
        d["index"] = i
        gpus.append(d)
    cfg["gpus"] = gpus
    cfg.setdefault("driver_loaded", True)
    cfg.setdefault("driver_version", DEFAULT_DRIVER)
    cfg.setdefault("cuda_version", DEFAULT_CUDA)
    cfg.setdefault("processes", [])
    return cfg


def load_state():
    try:
        with open(STATE_PATH) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def save_state(state):
    d = os.path.dirname(STATE_PATH)
    if d:
        os.makedirs(d, mode=0o755, exist_ok=True)
    tmp = "%s.tmp.%d" % (STATE_PATH, os.getpid())
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, STATE_PATH)


def gpu_state(state, g):
    s = state.get(g["uuid"], {})
    return {
        "persistence": bool(s.get("persistence", False)),
        "power_limit": float(s.get("power_limit", g["power_default"])),
    }


# ------------------------------------------------------------------------------------------
# --query-gpu
# ------------------------------------------------------------------------------------------

def _na(v):
    return v is None


def _w(v):
    return None if v is None else "%.2f" % float(v)


def _draw(g, st):
    """What the board draws: the configured draw, held under its power limit (a real board's
    firmware keeps the average draw at or below the limit)."""
    d = g["power_draw"]
    if d is None or not g.get("power_limit_supported", True):
        return d
    return min(float(d), st["power_limit"])


def _fields():
    """canonical field -> (unit or None, getter(g, st, cfg))"""
    return {
        "timestamp": (None, lambda g, s, c: time.strftime("%Y/%m/%d %H:%M:%S.000")),
        "driver_version": (None, lambda g, s, c: c["driver_version"]),
        "count": (None, lambda g, s, c: str(len(c["gpus"]))),
        "index": (None, lambda g, s, c: str(g["index"])),
        "name": (None, lambda g, s, c: g["name"]),
        "uuid": (None, lambda g, s, c: g["uuid"]),
        "serial": (None, lambda g, s, c: "[N/A]"),
        "pci.bus_id": (None, lambda g, s, c: g["pci_bus_id"]),
        "pci.bus": (None, lambda g, s, c: "0x" + g["pci_bus_id"].split(":")[1]),
        "compute_cap": (None, lambda g, s, c: str(g["compute_cap"])),
        "persistence_mode": (None, lambda g, s, c: "Enabled" if s["persistence"] else "Disabled"),
        "pstate": (None, lambda g, s, c: g["pstate"]),
        "fan.speed": ("%", lambda g, s, c: str(g["fan"])),
        "memory.total": ("MiB", lambda g, s, c: str(int(g["memory_total"]))),
        "memory.reserved": ("MiB", lambda g, s, c: str(int(g["memory_reserved"]))),
        "memory.used": ("MiB", lambda g, s, c: str(int(g["memory_used"]))),
        "memory.free": ("MiB", lambda g, s, c: str(int(g["memory_total"]) - int(g["memory_used"])
                                                  - int(g["memory_reserved"]))),
        "temperature.gpu": (None, lambda g, s, c: str(g["temperature"])),
        "utilization.gpu": ("%", lambda g, s, c: str(g["utilization"])),
        "utilization.memory": ("%", lambda g, s, c: "0"),
        "power.management": (None, lambda g, s, c: "Enabled" if g["power_limit_supported"]
                             else "[Not Supported]"),
        "power.draw": ("W", lambda g, s, c: _w(_draw(g, s))),
        "power.limit": ("W", lambda g, s, c: _w(s["power_limit"])),
        "enforced.power.limit": ("W", lambda g, s, c: _w(s["power_limit"])),
        "power.default_limit": ("W", lambda g, s, c: _w(g["power_default"])),
        "power.min_limit": ("W", lambda g, s, c: _w(g["power_min"])),
        "power.max_limit": ("W", lambda g, s, c: _w(g["power_max"])),
        "clocks.sm": ("MHz", lambda g, s, c: "210"),
        "clocks.mem": ("MHz", lambda g, s, c: "405"),
        "clocks.max.sm": ("MHz", lambda g, s, c: "2100"),
        "vbios_version": (None, lambda g, s, c: "94.02.42.00.A9"),
    }


_FIELD_ALIASES = {
    "gpu_name": "name", "gpu_uuid": "uuid", "gpu_bus_id": "pci.bus_id", "gpu_serial": "serial",
    "compute_capability": "compute_cap", "persistence.mode": "persistence_mode",
    "power.draw.instant": "power.draw", "power.limit.default": "power.default_limit",
    "power.default.limit": "power.default_limit", "power.min.limit": "power.min_limit",
    "power.max.limit": "power.max_limit", "enforced.power_limit": "enforced.power.limit",
    "temperature": "temperature.gpu", "driver.version": "driver_version",
    "clocks.current.sm": "clocks.sm", "clocks.current.memory": "clocks.mem",
    "clocks.memory": "clocks.mem", "fan_speed": "fan.speed",
}


def parse_format(fmt):
    opts = [o.strip() for o in fmt.split(",") if o.strip()]
    if "csv" not in opts:
        raise Exit(INVALID_ARG, err='"%s" is not a valid format. Only "csv" is supported.\n' % fmt)
    for o in opts:
        if o not in ("csv", "noheader", "nounits"):
            raise Exit(INVALID_ARG, err='"%s" is not a valid format option.\n' % o)
    return "noheader" in opts, "nounits" in opts


def render_csv(names, rows, noheader, nounits, units):
    out = []
    if not noheader:
        # the real tool keeps "[unit]" in the header even with nounits
        out.append(", ".join(n + (" [%s]" % units[i] if units[i] else "")
                             for i, n in enumerate(names)))
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            if v is None:
                cells.append("[N/A]")
            elif units[i] and not nounits and not v.startswith("["):
                cells.append("%s %s" % (v, units[i]))
            else:
                cells.append(v)
        out.append(", ".join(cells))
    return "".join(line + "\n" for line in out)


def query_gpu(cfg, gpus, state, fields_arg, fmt):
    table = _fields()
    names, units, getters = [], [], []
    for raw in fields_arg.split(","):
        f = raw.strip()
        if not f:
            continue
        canon = _FIELD_ALIASES.get(f, f)
        if canon not in table:
            raise Exit(INVALID_ARG, out='Field "%s" is not a valid field to query.\n\n' % f)
        unit, getter = table[canon]
        names.append(canon)
        units.append(unit)
        getters.append(getter)
    if not names:
        raise Exit(INVALID_ARG, err=BAD_ARGS_MSG)
    noheader, nounits = parse_format(fmt)
    rows = []
    for g in gpus:
        st = gpu_state(state, g)
        rows.append([get(g, st, cfg) for get in getters])
    return render_csv(names, rows, noheader, nounits, units)


def query_apps(cfg, gpus, fields_arg, fmt):
    table = {
        "timestamp": (None, lambda p, g: time.strftime("%Y/%m/%d %H:%M:%S.000")),
        "gpu_name": (None, lambda p, g: g["name"]),
        "gpu_bus_id": (None, lambda p, g: g["pci_bus_id"]),
        "gpu_serial": (None, lambda p, g: "[N/A]"),
        "gpu_uuid": (None, lambda p, g: g["uuid"]),
        "pid": (None, lambda p, g: str(p.get("pid", 0))),
        "process_name": (None, lambda p, g: p.get("process_name", "")),
        "name": (None, lambda p, g: p.get("process_name", "")),
        "used_gpu_memory": ("MiB", lambda p, g: str(p.get("used_memory", 0))),
        "used_memory": ("MiB", lambda p, g: str(p.get("used_memory", 0))),
    }
    names, units, getters = [], [], []
    for raw in fields_arg.split(","):
        f = raw.strip()
        if not f:
            continue
        if f not in table:
            raise Exit(INVALID_ARG, out='Field "%s" is not a valid field to query.\n\n' % f)
        names.append(f)
        units.append(table[f][0])
        getters.append(table[f][1])
    noheader, nounits = parse_format(fmt)
    by_index = {g["index"]: g for g in gpus}
    rows = []
    for p in cfg["processes"]:
        g = by_index.get(int(p.get("gpu", 0)))
        if g is not None:
            rows.append([get(p, g) for get in getters])
    return render_csv(names, rows, noheader, nounits, units)


# ------------------------------------------------------------------------------------------
# -pm / -pl
# ------------------------------------------------------------------------------------------

def _is_root():
    return os.geteuid() == 0


def _locked_state():
    d = os.path.dirname(STATE_PATH) or "."
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def set_persistence(gpus, value):
    v = value.strip().upper()
    if v in ("1", "ENABLED"):
        enable = True
    elif v in ("0", "DISABLED"):
        enable = False
    else:
        raise Exit(INVALID_ARG, err=BAD_ARGS_MSG)
    word = "Enabled" if enable else "Disabled"
    if not _is_root():
        return Exit(NO_PERMISSION, out="Unable to set persistence mode for GPU %s: Insufficient "
                    "Permissions\nTerminating early due to previous errors.\n" % gpus[0]["pci_bus_id"])
    fd = _locked_state()
    try:
        state = load_state()
        out = []
        for g in gpus:
            st = gpu_state(state, g)
            if st["persistence"] == enable:
                out.append("Persistence mode is already %s for GPU %s.\n" % (word, g["pci_bus_id"]))
            else:
                out.append("%s persistence mode for GPU %s.\n" % (word, g["pci_bus_id"]))
                state.setdefault(g["uuid"], {})["persistence"] = enable
        save_state(state)
    finally:
        os.close(fd)
    out.append("All done.\n")
    return Exit(OK, out="".join(out))


def set_power_limit(gpus, value):
    try:
        watts = float(value)
    except ValueError:
        raise Exit(INVALID_ARG, err='Provided power limit "%s" is not a valid number.\n%s'
                   % (value, BAD_ARGS_MSG))
    if not _is_root():
        return Exit(NO_PERMISSION, out="Changing power management limit for GPU %s is not allowed: "
                    "Insufficient Permissions\nTerminating early due to previous errors.\n"
                    % gpus[0]["pci_bus_id"])
    fd = _locked_state()
    out = []
    code = OK
    try:
        state = load_state()
        for g in gpus:
            bus = g["pci_bus_id"]
            if not g.get("power_limit_supported", True):
                out.append("Changing power management limit is not supported for GPU: %s.\n"
                           "Treating as warning and moving on.\n" % bus)
                continue
            lo, hi = float(g["power_min"]), float(g["power_max"])
            if watts < lo or watts > hi:
                out.append("Provided power limit %.2f W is not a valid power limit which should be "
                           "between %.2f W and %.2f W for GPU %s\n"
                           "Terminating early due to previous errors.\n" % (watts, lo, hi, bus))
                code = INVALID_ARG
                break
            st = gpu_state(state, g)
            out.append("Power limit for GPU %s was set to %.2f W from %.2f W.\n"
                       % (bus, watts, st["power_limit"]))
            state.setdefault(g["uuid"], {})["power_limit"] = watts
            if not st["persistence"]:
                out.append("\nWarning: persistence mode is disabled on device %s. See the Known "
                           "Issues section of the nvidia-smi(1) man page for more information. "
                           "Run with [--help | -h] switch to get more information on how to "
                           "enable persistence mode.\n" % bus)
        save_state(state)
    finally:
        os.close(fd)
    if code == OK:
        out.append("All done.\n")
    return Exit(code, out="".join(out))


# ------------------------------------------------------------------------------------------
# -L, summary, --version
# ------------------------------------------------------------------------------------------

def list_gpus(gpus):
    return "".join("GPU %d: %s (UUID: %s)\n" % (g["index"], g["name"], g["uuid"]) for g in gpus)


def summary(cfg, gpus, state):
    w = 89
    bar = "+" + "-" * (w) + "+\n"
    sep = "+-----------------------------------------+------------------------+----------------------+\n"
    head = "| NVIDIA-SMI %-22s Driver Version: %-14s CUDA Version: %-9s|\n" % (
        cfg["driver_version"], cfg["driver_version"], cfg["cuda_version"])
    lines = [time.strftime("%a %b %d %H:%M:%S %Y") + "       \n", bar, head,
             "|-----------------------------------------+------------------------+----------------------+\n",
             "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n",
             "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |\n",
             "|                                         |                        |               MIG M. |\n",
             "|=========================================+========================+======================|\n"]
    for g in gpus:
        st = gpu_state(state, g)
        name = g["name"][:28]
        lines.append("| %3d  %-29s %4s | %18s Off | %20s |\n" % (
            g["index"], name, "On" if st["persistence"] else "Off", g["pci_bus_id"], "N/A"))
        pwr = "%dW / %4dW" % (round(float(_draw(g, st))), round(st["power_limit"]))
        mem = "%dMiB / %6dMiB" % (int(g["memory_used"]), int(g["memory_total"]))
        lines.append("| %3s%%  %3dC    %-4s %20s | %22s | %6s%%      Default |\n" % (
            g["fan"], int(g["temperature"]), g["pstate"], pwr, mem, g["utilization"]))
        lines.append("|                                         |                        |                  N/A |\n")
        lines.append(sep)
    lines.append(" " * (w + 2) + "\n")
    lines.append(bar)
    lines.append("| %-*s|\n" % (w - 1, "Processes:"))
    lines.append("| %-*s|\n" % (w - 1, " GPU   GI   CI              PID   Type   Process name"
                                     "                        GPU Memory"))
    lines.append("| %-*s|\n" % (w - 1, "       ID   ID                                          "
                                     "                     Usage"))
    lines.append("|" + "=" * w + "|\n")
    if not cfg["processes"]:
        lines.append("| %-*s|\n" % (w - 1, " No running processes found"))
    for p in cfg["processes"]:
        lines.append("| %-*s|\n" % (w - 1, "  %3s   N/A  N/A  %11s      C   %-35s %6sMiB" % (
            p.get("gpu", 0), p.get("pid", 0), p.get("process_name", "")[:35],
            p.get("used_memory", 0))))
    lines.append(bar)
    return "".join(lines)


def query_text(cfg, gpus, state, display):
    """A subset of ``nvidia-smi -q`` (labels as in the 570 driver; prefer --query-gpu)."""
    sections = {d.strip().upper() for d in (display or "").split(",") if d.strip()}
    want = (lambda name: not sections or name in sections)
    out = ["", "==============NVSMI LOG==============", "",
           "%-42s: %s" % ("Timestamp", time.strftime("%a %b %d %H:%M:%S %Y")),
           "%-42s: %s" % ("Driver Version", cfg["driver_version"]),
           "%-42s: %s" % ("CUDA Version", cfg["cuda_version"]), "",
           "%-42s: %d" % ("Attached GPUs", len(cfg["gpus"]))]

    def kv(indent, key, val):
        out.append("%s%-*s: %s" % (" " * indent, 42 - indent, key, val))

    for g in gpus:
        st = gpu_state(state, g)
        out.append("GPU %s" % g["pci_bus_id"])
        if not sections:
            kv(4, "Product Name", g["name"])
            kv(4, "Persistence Mode", "Enabled" if st["persistence"] else "Disabled")
            kv(4, "GPU UUID", g["uuid"])
            kv(4, "Minor Number", g["index"])
            kv(4, "VBIOS Version", "94.02.42.00.A9")
            out.append("    PCI")
            kv(8, "Bus Id", g["pci_bus_id"])
        if want("MEMORY"):
            out.append("    FB Memory Usage")
            kv(8, "Total", "%d MiB" % int(g["memory_total"]))
            kv(8, "Reserved", "%d MiB" % int(g["memory_reserved"]))
            kv(8, "Used", "%d MiB" % int(g["memory_used"]))
            kv(8, "Free", "%d MiB" % (int(g["memory_total"]) - int(g["memory_used"])
                                      - int(g["memory_reserved"])))
        if want("TEMPERATURE"):
            out.append("    Temperature")
            kv(8, "GPU Current Temp", "%d C" % int(g["temperature"]))
        if want("POWER"):
            na = "N/A" if g["power_limit_supported"] else "[Not Supported]"
            out.append("    GPU Power Readings")
            kv(8, "Power Draw", "%.2f W" % float(_draw(g, st)))
            kv(8, "Current Power Limit", "%.2f W" % st["power_limit"]
               if g["power_limit_supported"] else na)
            kv(8, "Requested Power Limit", "%.2f W" % st["power_limit"]
               if g["power_limit_supported"] else na)
            kv(8, "Default Power Limit", "%.2f W" % float(g["power_default"]))
            kv(8, "Min Power Limit", "%.2f W" % float(g["power_min"]))
            kv(8, "Max Power Limit", "%.2f W" % float(g["power_max"]))
        out.append("")
    return "\n".join(out) + "\n"


def version(cfg):
    drv = cfg["driver_version"]
    return ("NVIDIA-SMI version  : %s\nNVML version        : %s\nDRIVER version      : %s\n"
            "CUDA Version        : %s\n" % (drv, drv.rsplit(".", 1)[0], drv, cfg["cuda_version"]))


USAGE = """NVIDIA System Management Interface -- v{drv} (fake, for tests)

Supported: nvidia-smi [-L] [-i IDS] [--query-gpu=FIELDS --format=csv[,noheader][,nounits]]
           [--query-compute-apps=FIELDS --format=...] [-pm 0|1] [-pl WATTS] [--version]
           [-q [-d MEMORY,POWER,TEMPERATURE]]
"""


# ------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------

_LONG = {"--id": "-i", "--persistence-mode": "-pm", "--power-limit": "-pl",
         "--list-gpus": "-L", "--help": "-h", "--query": "-q", "--display": "-d"}
_WITH_VALUE = {"-i", "-pm", "-pl", "--query-gpu", "--query-compute-apps", "--format", "-d"}


def parse_args(argv):
    opts = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        val = None
        if a.startswith("--") and "=" in a:
            a, val = a.split("=", 1)
        elif a.startswith("-i") and len(a) > 2 and not a.startswith("-i="):
            a, val = "-i", a[2:]
        elif a.startswith("-i="):
            a, val = "-i", a[3:]
        a = _LONG.get(a, a)
        if a in _WITH_VALUE:
            if val is None:
                i += 1
                if i >= len(argv):
                    raise Exit(INVALID_ARG, err=BAD_ARGS_MSG)
                val = argv[i]
            opts[a] = val
        elif a in ("-L", "-h", "-q", "--version", "-a"):
            opts[a] = True
        else:
            raise Exit(INVALID_ARG, err=BAD_ARGS_MSG)
        i += 1
    return opts


def select(gpus, ids):
    chosen = []
    for tok in ids.split(","):
        tok = tok.strip()
        if not tok:
            continue
        hit = None
        for g in gpus:
            bus = g["pci_bus_id"].lower()
            if tok == str(g["index"]) or tok.lower() in (g["uuid"].lower(), bus, bus[4:]):
                hit = g
        if hit is None:
            raise Exit(NOT_FOUND, out="No devices were found\n")
        if hit not in chosen:
            chosen.append(hit)
    if not chosen:
        raise Exit(INVALID_ARG, err=BAD_ARGS_MSG)
    return chosen


def run(argv):
    opts = parse_args(argv)
    cfg = load_config()
    if opts.get("-h"):
        return Exit(OK, out=USAGE.format(drv=cfg["driver_version"]))
    if not cfg["driver_loaded"]:
        return Exit(NO_DRIVER, out=NO_DRIVER_MSG)
    if opts.get("--version"):
        return Exit(OK, out=version(cfg))
    gpus = cfg["gpus"]
    if not gpus:
        return Exit(NOT_FOUND, out="No devices were found\n")
    if "-i" in opts:
        gpus = select(gpus, opts["-i"])
    actions = [k for k in ("-pm", "-pl", "--query-gpu", "--query-compute-apps", "-L", "-q")
               if k in opts]
    if len(actions) > 1:
        return Exit(INVALID_ARG, err=BAD_ARGS_MSG)
    if "-pm" in opts:
        return set_persistence(gpus, opts["-pm"])
    if "-pl" in opts:
        return set_power_limit(gpus, opts["-pl"])
    fmt = opts.get("--format")
    if "--query-gpu" in opts or "--query-compute-apps" in opts:
        if fmt is None:
            return Exit(INVALID_ARG, err='"--format" option is required with --query-* options.\n'
                        + BAD_ARGS_MSG)
        if "--query-gpu" in opts:
            return Exit(OK, out=query_gpu(cfg, gpus, load_state(), opts["--query-gpu"], fmt))
        return Exit(OK, out=query_apps(cfg, gpus, opts["--query-compute-apps"], fmt))
    if "-L" in opts:
        return Exit(OK, out=list_gpus(gpus))
    if "-q" in opts:
        return Exit(OK, out=query_text(cfg, gpus, load_state(), opts.get("-d")))
    return Exit(OK, out=summary(cfg, gpus, load_state()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        res = run(argv)
    except Exit as e:
        res = e
    except Exception as e:  # pragma: no cover - keep the real tool's "other error" contract
        res = Exit(OTHER, err="fake nvidia-smi: %s: %s\n" % (type(e).__name__, e))
    if res.out:
        sys.stdout.write(res.out)
    if res.err:
        sys.stderr.write(res.err)
    sys.stdout.flush()
    return res.code


if __name__ == "__main__":
    sys.exit(main())
