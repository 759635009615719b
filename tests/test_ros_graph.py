"""The launch files and the bringup describe the same node graph (no launch/launch_ros needed: stubs record)."""

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from coop_transport.bringup import Bringup, parse_overrides
from coop_transport.ros import graph

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "ros2_ws" / "src" / "coop_transport"


# ------------------------------------------------------------------------------- stub launch / launch_ros
class _Obj:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


def _stub_modules() -> dict:
    """Minimal launch / launch_ros modules whose classes record their arguments."""
    mods = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.substitutions", "launch.launch_description_sources", "launch.conditions",
        "launch_ros", "launch_ros.actions", "launch_ros.substitutions", "launch_ros.parameter_descriptions")}
    mods["launch"].LaunchDescription = lambda entities: _Obj(entities)
    for cls in ("DeclareLaunchArgument", "OpaqueFunction", "IncludeLaunchDescription", "Shutdown"):
        setattr(mods["launch.actions"], cls, type(cls, (_Obj,), {}))
    mods["launch.substitutions"].LaunchConfiguration = _LaunchConfiguration
    mods["launch.substitutions"].PathJoinSubstitution = type("PathJoinSubstitution", (_Obj,), {})
    mods["launch.launch_description_sources"].PythonLaunchDescriptionSource = type("PythonLDS", (_Obj,), {})
    mods["launch.conditions"].IfCondition = type("IfCondition", (_Obj,), {})
    mods["launch_ros.actions"].Node = type("Node", (_Obj,), {})
    mods["launch_ros.substitutions"].FindPackageShare = type("FindPackageShare", (_Obj,), {})
    mods["launch_ros.parameter_descriptions"].ParameterValue = type("ParameterValue", (_Obj,), {})
    mods["launch"].actions = mods["launch.actions"]
    mods["launch_ros"].actions = mods["launch_ros.actions"]
    return mods


def run_launch_file(path: Path, overrides: dict, monkeypatch) -> tuple[list, list, list]:
    """Execute a launch file as ros2 launch would (with stubs): (declared arguments, Node kwargs, includes)."""
    for name, module in _stub_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(f"launch_file_{path.stem.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = [e for e in description.args[0] if type(e).__name__ == "DeclareLaunchArgument"]
    opaque = [e for e in description.args[0] if type(e).__name__ == "OpaqueFunction"]
    assert len(opaque) == 1
    configs = {d.args[0]: d.kwargs["default_value"] for d in declared}
    configs.update(overrides)
    context = types.SimpleNamespace(launch_configurations=configs)
    actions = opaque[0].kwargs["function"](context, *opaque[0].kwargs.get("args", []))
    nodes = [a.kwargs for a in actions if type(a).__name__ == "Node"]
    includes = [a for a in actions if type(a).__name__ == "IncludeLaunchDescription"]
    return declared, nodes, includes


def _unwrap(value):
    if type(value).__name__ == "ParameterValue":
        assert value.kwargs["value_type"] is str and isinstance(value.args[0], str)
        return value.args[0]
    return value


def _from_launch(kw: dict) -> dict:
    params = kw.get("parameters", [])
    overrides = next((p for p in params if isinstance(p, dict)), {})
    return {"package": kw["package"], "executable": kw["executable"], "name": kw["name"],
            "namespace": kw["namespace"].strip("/"), "params_files": [p for p in params if isinstance(p, str)],
            "parameters": {k: _unwrap(v) for k, v in overrides.items()},
            "remappings": [tuple(r) for r in kw.get("remappings", [])], "arguments": list(kw.get("arguments", [])),
            "ros_arguments": list(kw.get("ros_arguments", [])), "required": "on_exit" in kw}


def _console_scripts() -> dict:
    """setup.py's NODES table: console script -> module."""
    tree = ast.parse((PACKAGE_DIR / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NODES":
            return ast.literal_eval(node.value)
    raise AssertionError("NODES not found in setup.py")


def _from_bringup(bringup: Bringup, full_name: str, cmd: list[str]) -> dict:
    spec = bringup.specs[full_name]
    module = cmd[cmd.index("-m") + 1]
    executable = {m: e for e, m in _console_scripts().items()}[module]
    ros = cmd[cmd.index("--ros-args") + 1:]
    remaps, files, rest, i = [], [], [], 0
    while i < len(ros):
        if ros[i] == "-r":
            remaps.append(tuple(ros[i + 1].split(":=", 1)))
            i += 2
        elif ros[i] == "--params-file":
            files.append(ros[i + 1])
            i += 2
        else:
            rest.append(ros[i])
            i += 1
    special = dict(r for r in remaps if r[0].startswith("__"))
    parameters = {}
    if spec.parameters:
        overrides = json.loads(Path(files.pop()).read_text())  # the last file: the graph's typed overrides
        assert list(overrides) == [full_name]
        parameters = overrides[full_name]["ros__parameters"]
    return {"package": "coop_transport", "executable": executable, "name": special["__node"],
            "namespace": special.get("__ns", "").strip("/"), "params_files": files, "parameters": parameters,
            "remappings": [r for r in remaps if not r[0].startswith("__")],
            "arguments": cmd[cmd.index("-m") + 2:cmd.index("--ros-args")], "ros_arguments": rest,
            "required": spec.required}


CASES = [
    ("sim", {}),
    ("sim", {"use_sim_time": "false", "chunk_length": "25", "clip_sigma": "2", "left_policy": "/ckpt/left",
             "architecture": "V5", "horizon": "40", "agentview": "true", "right_namespace": "rechts"}),
    ("sim", {"policy_server": "127.0.0.1:8000", "policy_server_timeout": "0.5"}),
    ("franka", {}),
    ("franka", {"cameras": "none", "start_franka": "false", "num_samples": "1", "clip_sigma": "-1"}),
    ("franka", {"backend": "libfranka", "left_robot_ip": "127.0.0.1", "inference_backend": "onnx"}),
]


@pytest.mark.parametrize("profile,overrides", CASES)
def test_launch_file_and_bringup_describe_the_same_graph(profile, overrides, monkeypatch):
    declared, launch_nodes, includes = run_launch_file(REPO / "launch" / f"{profile}.launch.py", overrides,
                                                       monkeypatch)
    assert all(d.kwargs["description"] for d in declared), "every launch argument is described"
    names = {d.args[0] for d in declared}
    for needed in ("left_policy", "right_policy", "architecture", "chunk_length", "num_samples", "clip_sigma"):
        assert needed in names
    if profile == "sim":
        assert "use_sim_time" in names

    bringup = Bringup(graph.build_graph(profile, overrides))
    try:
        ours = sorted((_from_bringup(bringup, name, cmd) for name, cmd in bringup.commands.items()),
                      key=lambda n: (n["namespace"], n["name"]))
        external = sorted(((n.package, n.executable, n.namespace) for n in bringup.external_nodes))
    finally:
        bringup.stop(0)
    launched = [_from_launch(kw) for kw in launch_nodes]
    launched_ours = sorted((n for n in launched if n["package"] == "coop_transport"),
                           key=lambda n: (n["namespace"], n["name"]))
    assert launched_ours == ours
    assert sorted((n["package"], n["executable"], n["namespace"]) for n in launched
                  if n["package"] != "coop_transport") == external
    assert len(includes) == len(graph.build_graph(profile, overrides).includes)


def test_graph_contents_and_typed_overrides():
    g = graph.build_graph("sim", {"clip_sigma": "2", "use_sim_time": "true", "chunk_length": "25"})
    bridge = next(n for n in g.nodes if n.name == "sim_bridge")
    left = next(n for n in g.nodes if n.namespace == "left")
    right = next(n for n in g.nodes if n.namespace == "right")
    assert bridge.required and not left.required and not right.required
    assert bridge.parameters["time_mode"] == "lockstep" and left.parameters["use_sim_time"] is True
    assert left.parameters["clip_sigma"] == 2.0 and isinstance(left.parameters["clip_sigma"], float)
    assert left.parameters["chunk_length"] == 25 and left.parameters["arm"] == "robot0"
    assert right.parameters["arm"] == "robot1"
    assert ("partner_message", "/right/message") in left.remappings
    assert ("partner_message", "/left/message") in right.remappings
    assert left.params_files[0].endswith("config/sim.yaml") and Path(left.params_files[0]).exists()
    assert "num_samples" not in left.parameters  # empty launch argument: the YAML / node default decides
    plain = graph.build_graph("sim", {"clip_beyond_demonstrated": "false"})
    assert plain.nodes[1].parameters["clip_beyond_demonstrated"] is False
    wall = graph.build_graph("sim", {"use_sim_time": "false"})
    assert wall.nodes[0].parameters["time_mode"] == "wall"
    with pytest.raises(ValueError, match="unknown launch arguments"):
        graph.build_graph("sim", {"chunk_lenght": "10"})
    with pytest.raises(ValueError, match="chunk_length"):
        graph.build_graph("sim", {"chunk_length": "ten"})
    assert parse_overrides(["a:=1", "b:=x:=y"]) == {"a": "1", "b": "x:=y"}
    assert "policy_server" not in left.parameters  # local inference unless a server is named
    remote = graph.build_graph("sim", {"policy_server": "10.0.0.5:8000", "policy_server_timeout": "0.5"})
    for node in remote.nodes[1:]:
        assert node.parameters["policy_server"] == "10.0.0.5:8000" and node.parameters["policy_server_timeout"] == 0.5
    with pytest.raises(ValueError, match="left_policy.*policy_server"):
        graph.build_graph("sim", {"policy_server": "10.0.0.5:8000", "left_policy": "/ckpt"})


def test_franka_backends_share_the_graph():
    """backend:=libfranka: the same policy nodes and bridges (only the bridges' robot parameters differ), no
    franka_ros2 includes or controller spawners."""
    ros2 = graph.build_graph("franka", {"cameras": "none"})
    lib = graph.build_graph("franka", {"cameras": "none", "backend": "libfranka", "right_robot_ip": "10.0.0.3",
                                       "inference_backend": "onnx"})
    assert not lib.includes and len(ros2.includes) == 2
    assert [n.full_name for n in lib.nodes] == [n.full_name for n in ros2.own_nodes]
    bridges = {n.namespace: n.parameters for n in lib.nodes if n.name == "franka_bridge"}
    assert bridges["left"] == {"arm": "robot0", "backend": "libfranka", "robot_type": "fr3", "robot_ip": "172.16.0.2"}
    assert bridges["right"]["robot_ip"] == "10.0.0.3"
    assert next(n for n in ros2.nodes if n.name == "franka_bridge").parameters["backend"] == "franka_ros2"
    assert next(n for n in lib.nodes if n.name == "policy_node").parameters["backend"] == "onnx"
    with pytest.raises(ValueError, match="backend must be one of"):
        graph.build_graph("franka", {"backend": "ros1"})
    with pytest.raises(ValueError, match="franky-sim"):
        graph.build_graph("franka", {"backend": "libfranka", "use_fake_hardware": "true"})


def test_package_installs_launch_and_config():
    """setup.py's data_files find the launch files and YAML through the package's links to the repo root."""
    for sub, pattern in (("launch", "*.launch.py"), ("config", "*.yaml")):
        link = PACKAGE_DIR / sub
        assert link.is_symlink() and link.resolve() == (REPO / sub).resolve()
        assert sorted(p.name for p in link.glob(pattern)) == sorted(p.name for p in (REPO / sub).glob(pattern))
    xml = (PACKAGE_DIR / "package.xml").read_text()
    assert 'format="3"' in xml and "@" in xml.split("<maintainer email=")[1].split(">")[0]
    assert (PACKAGE_DIR / "resource" / "coop_transport").exists()


def test_bringup_registers_the_package_in_the_ament_index():
    """Pip-only installs: the bringup's environment makes the nodes' ament index resolve coop_transport's share/
    (an editable install installs no data files) and the ROS wheels' packages."""
    import subprocess

    bringup = Bringup(graph.build_graph("sim"))
    try:
        code = ("from ament_index_python.packages import get_package_share_directory as d; "
                "import pathlib; p = pathlib.Path(d('coop_transport')); "
                "assert (p / 'config' / 'sim.yaml').exists() and (p / 'launch' / 'sim.launch.py').exists(); "
                "print(d('sensor_msgs'))")
        out = subprocess.run([sys.executable, "-c", code], env=bringup.env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "sensor_msgs" in out.stdout
    finally:
        bringup.stop(0)
