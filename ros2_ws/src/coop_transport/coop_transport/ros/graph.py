"""The node graph, described once: nodes, executables, namespaces, parameters, remappings, which are required.

Both consumers read this description:
- the real launch files ``launch/sim.launch.py`` and ``launch/franka.launch.py`` (``ros2 launch coop_transport ...``)
  call ``launch_description(profile)``, which declares every ``LaunchArgument`` below and, at launch time, turns
  ``build_graph(profile, arguments)`` into launch_ros ``Node`` actions (and franka_ros2 / camera includes);
- ``python -m coop_transport.bringup PROFILE`` (pip-only installs, CI) turns the same ``build_graph`` result into
  ``python -m <module> --ros-args ...`` processes.

Parameters: each node loads the profile's YAML (``config/<profile>.yaml``, keys ``/**/node_name`` and
``/<namespace>/node_name``) and then the overrides of this graph (typed values from launch arguments), which take
precedence because they are keyed by the node's full name, as launch_ros does for dict parameters.
A launch argument left empty changes nothing: the YAML (or the node's declared default) decides.

Plain Python on purpose (no rclpy, launch or numpy): ``ros2 launch`` imports it in its own interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coop_transport.constants import ARMS
from coop_transport.ros import topics

PACKAGE = "coop_transport"
PROFILES = ("sim", "franka")
DEFAULT_POLICY_FACTORY = "coop_transport.deploy:load_arm_policy"


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str


@dataclass(frozen=True)
class NodeSpec:
    """One node of the graph."""

    name: str
    executable: str  # console script (ros2 run / launch_ros) of ``package``
    module: str | None = None  # ``python -m`` module for the bringup; None: another package's node (launch only)
    package: str = PACKAGE
    namespace: str = ""
    params_files: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict)  # typed overrides, keyed by the node's full name
    remappings: tuple[tuple[str, str], ...] = ()
    arguments: tuple[str, ...] = ()  # plain command-line arguments (before --ros-args)
    ros_arguments: tuple[str, ...] = ()  # extra --ros-args (e.g. --log-level)
    required: bool = False  # its exit shuts the whole graph down

    @property
    def full_name(self) -> str:
        return topics.in_namespace(self.namespace, self.name)


@dataclass(frozen=True)
class IncludeSpec:
    """Another package's launch file (launch only: franka_ros2, camera drivers)."""

    package: str
    launch_file: str  # relative to the package's share directory
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Graph:
    profile: str
    nodes: tuple[NodeSpec, ...]
    includes: tuple[IncludeSpec, ...] = ()
    arguments: dict = field(default_factory=dict)  # the resolved launch arguments

    @property
    def own_nodes(self) -> tuple[NodeSpec, ...]:
        """Nodes of this package (what the bringup starts)."""
        return tuple(n for n in self.nodes if n.module is not None)


# ------------------------------------------------------------------------------------------ launch arguments
_POLICY_ARGS = [
    LaunchArgument("left_policy", "", "Checkpoint of the left arm's (robot0) policy; empty = the shipped default."),
    LaunchArgument("right_policy", "", "Checkpoint of the right arm's (robot1) policy; empty = the shipped default."),
    LaunchArgument("policy_factory", DEFAULT_POLICY_FACTORY, "'module:function' that loads each arm's policy."),
    LaunchArgument("policy_server", "", "host:port of a policy server (python -m coop_transport.serve) that both "
                   "arms' policy nodes query instead of loading left_policy/right_policy; empty = local inference."),
    LaunchArgument("policy_server_timeout", "", "Remote mode: seconds (wall) without an answer before the watchdog "
                   "holds the arm; empty = config/default (1.0)."),
    LaunchArgument("architecture", "", "Expected message architecture (V4, V5, V6); empty = from the checkpoint."),
    LaunchArgument("inference_backend", "", "Inference backend of the policies (auto, torch, onnx, cudagraph); empty = "
                   "config (auto: CUDA graphs on a GPU, ONNX Runtime where the checkpoint has an export, else torch)."),
    LaunchArgument("chunk_length", "", "Recipe: actions executed per chunk (C); empty = config/default (10)."),
    LaunchArgument("num_samples", "", "Recipe: samples averaged per chunk (mean-of-N); empty = default (4)."),
    LaunchArgument("clip_sigma", "", "Recipe: clip actions to mean +- k std (<= 0 disables); empty = default (2)."),
    LaunchArgument("clip_beyond_demonstrated", "", "Recipe: widen each clip bound to the demonstrated action range "
                   "(false: the plain mean +- k std); empty = default (true)."),
    LaunchArgument("left_namespace", topics.DEFAULT_NAMESPACES["robot0"], "Namespace of robot0 (payload arm)."),
    LaunchArgument("right_namespace", topics.DEFAULT_NAMESPACES["robot1"], "Namespace of robot1 (receiver arm)."),
    LaunchArgument("log_level", "info", "ROS log level of every node."),
]

LAUNCH_ARGUMENTS: dict[str, list[LaunchArgument]] = {
    "sim": _POLICY_ARGS + [
        LaunchArgument("params_file", "", "Parameter YAML; empty = share/coop_transport/config/sim.yaml."),
        LaunchArgument("use_sim_time", "true", "true: simulated time, the bridge publishes /clock and steps in "
                       "lockstep with both policies (CPU machines); false: 20 Hz wall clock (GPU machines)."),
        LaunchArgument("image_size", "", "Camera resolution rendered by the bridge; must match the policies' "
                       "(empty = config, 96)."),
        LaunchArgument("agentview", "", "Render and publish /agentview/image_raw (true/false; empty = config)."),
        LaunchArgument("horizon", "", "Control steps per episode (empty = 500)."),
        LaunchArgument("first_seed", "", "Reset seed of the first episode (empty = 1)."),
        LaunchArgument("max_episodes", "", "Stop after this many episodes (empty or 0 = run forever)."),
        LaunchArgument("results_path", "", "Append each finished episode as a JSON line to this file."),
    ],
    "franka": _POLICY_ARGS + [
        LaunchArgument("params_file", "", "Parameter YAML; empty = share/coop_transport/config/franka.yaml."),
        LaunchArgument("backend", "franka_ros2", "How the bridges drive the arms: franka_ros2 (its controllers, "
                       "started here unless start_franka:=false) or libfranka (the control units directly through "
                       "franky-control; no franka_ros2)."),
        LaunchArgument("robot_type", "fr3", "franka_ros2 robot type (fr3, fer); the joint-name prefix."),
        LaunchArgument("left_robot_ip", "172.16.0.2", "Hostname or IP of the left arm's control unit."),
        LaunchArgument("right_robot_ip", "172.16.0.3", "Hostname or IP of the right arm's control unit."),
        LaunchArgument("start_franka", "true", "franka_ros2 backend: include franka_bringup for both arms (false: "
                       "already running)."),
        LaunchArgument("use_fake_hardware", "false", "franka_ros2 mock hardware (no robot; no gripper actions)."),
        LaunchArgument("controller", "cartesian_impedance_example_controller",
                       "franka_ros2 controller with an equilibrium_pose (PoseStamped) input."),
        LaunchArgument("cameras", "realsense", "Wrist camera drivers to start: realsense or none."),
        LaunchArgument("left_camera_serial", "", "Serial number of the left wrist RealSense."),
        LaunchArgument("right_camera_serial", "", "Serial number of the right wrist RealSense."),
    ],
}


def launch_arguments(profile: str) -> list[LaunchArgument]:
    if profile not in LAUNCH_ARGUMENTS:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    return LAUNCH_ARGUMENTS[profile]


def resolve_arguments(profile: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Defaults of ``profile``'s launch arguments with ``overrides`` applied; unknown names raise ValueError."""
    values = {a.name: a.default for a in launch_arguments(profile)}
    unknown = sorted(set(overrides or {}) - set(values))
    if unknown:
        raise ValueError(f"unknown launch arguments {unknown} for {profile!r}; known: {sorted(values)}")
    values.update({k: str(v) for k, v in (overrides or {}).items()})
    return values


# ------------------------------------------------------------------------------------------ typed overrides
def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _typed(values: dict[str, str], spec: dict[str, tuple[str, type]]) -> dict:
    """{param: typed value} for every non-empty launch argument in ``spec`` ({argument: (param, type)})."""
    out = {}
    for arg, (param, kind) in spec.items():
        text = values.get(arg, "")
        if text == "":
            continue
        try:
            out[param] = _bool(text) if kind is bool else kind(text)
        except ValueError as err:
            raise ValueError(f"launch argument {arg}:={text!r}: {err}") from None
    return out


def _policy_overrides(values: dict[str, str], arm: str) -> dict:
    side = "left" if arm == "robot0" else "right"
    params = {"arm": arm, "policy_factory": values["policy_factory"] or DEFAULT_POLICY_FACTORY}
    if values[f"{side}_policy"]:
        if values["policy_server"]:
            raise ValueError(f"{side}_policy:={values[f'{side}_policy']!r} and policy_server:="
                             f"{values['policy_server']!r} both given; the server's --policy decides in remote mode")
        params["policy_path"] = values[f"{side}_policy"]
    params.update(_typed(values, {"policy_server": ("policy_server", str),
                                  "policy_server_timeout": ("policy_server_timeout", float),
                                  "architecture": ("architecture", str), "inference_backend": ("backend", str),
                                  "chunk_length": ("chunk_length", int), "num_samples": ("num_samples", int),
                                  "clip_sigma": ("clip_sigma", float),
                                  "clip_beyond_demonstrated": ("clip_beyond_demonstrated", bool)}))
    return params


def _namespaces(values: dict[str, str]) -> dict[str, str]:
    ns = {"robot0": values["left_namespace"].strip("/"), "robot1": values["right_namespace"].strip("/")}
    if not all(ns.values()) or ns["robot0"] == ns["robot1"]:
        raise ValueError(f"the two arms need distinct, non-empty namespaces, got {ns}")
    return ns


def _partner(arm: str) -> str:
    return ARMS[1 - ARMS.index(arm)]


# --------------------------------------------------------------------------------------------------- graphs
def build_graph(profile: str, arguments: dict[str, str] | None = None, share: str | None = None) -> Graph:
    """The graph of ``profile`` for the given launch arguments (strings, as on a command line)."""
    values = resolve_arguments(profile, arguments)
    if share is None:
        from coop_transport.ros.paths import share_dir

        share = str(share_dir())
    params_file = values["params_file"] or f"{share}/config/{profile}.yaml"
    ros_args = ("--log-level", values["log_level"]) if values["log_level"] else ()
    ns = _namespaces(values)
    build = _build_sim if profile == "sim" else _build_franka
    nodes, includes = build(values, ns, params_file, ros_args)
    return Graph(profile, tuple(nodes), tuple(includes), values)


def _build_sim(values, ns, params_file, ros_args):
    sim_time = _bool(values["use_sim_time"])
    bridge_params = {"time_mode": "lockstep" if sim_time else "wall",
                     "arm_namespaces": [ns[a] for a in ARMS]}
    bridge_params.update(_typed(values, {"image_size": ("image_size", int), "agentview": ("agentview", bool),
                                         "horizon": ("horizon", int), "first_seed": ("first_seed", int),
                                         "max_episodes": ("max_episodes", int),
                                         "results_path": ("results_path", str)}))
    nodes = [NodeSpec(name="sim_bridge", executable="sim_bridge_node", module="coop_transport.ros.sim_bridge_node",
                      params_files=(params_file,), parameters=bridge_params, ros_arguments=ros_args, required=True)]
    for arm in ARMS:
        params = _policy_overrides(values, arm)
        params["use_sim_time"] = sim_time
        nodes.append(NodeSpec(
            name="policy_node", executable="policy_node", module="coop_transport.ros.policy_node",
            namespace=ns[arm], params_files=(params_file,), parameters=params, ros_arguments=ros_args,
            remappings=((topics.PARTNER_MESSAGE, topics.in_namespace(ns[_partner(arm)], topics.MESSAGE)),
                        (topics.AGENTVIEW_IMAGE, topics.AGENTVIEW_TOPIC),
                        (topics.EPISODE, topics.EPISODE_TOPIC)),
            required=False))  # a dead policy leaves its arm held by the bridge; the other arm goes on
    return nodes, []


FRANKA_NAMESPACE = "franka_{ns}"  # franka_ros2's namespace of the arm whose policy namespace is {ns}


FRANKA_BACKENDS = ("franka_ros2", "libfranka")


def _build_franka(values, ns, params_file, ros_args):
    nodes, includes = [], []
    controller = values["controller"]
    backend = values["backend"]
    if backend not in FRANKA_BACKENDS:
        raise ValueError(f"launch argument backend must be one of {FRANKA_BACKENDS}, got {backend!r}")
    if backend == "libfranka" and _bool(values["use_fake_hardware"]):
        raise ValueError("use_fake_hardware is franka_ros2's mock hardware; with backend:=libfranka use franky-sim "
                         "(python -m coop_transport.franky_sim) as the robot instead")
    for arm in ARMS:
        side = "left" if arm == "robot0" else "right"
        franka_ns = FRANKA_NAMESPACE.format(ns=ns[arm])
        policy_remaps = [(topics.PARTNER_MESSAGE, topics.in_namespace(ns[_partner(arm)], topics.MESSAGE))]
        if values["cameras"] == "realsense":
            policy_remaps.append((topics.WRIST_IMAGE, "wrist_camera/color/image_raw"))
        params = _policy_overrides(values, arm)
        params["use_sim_time"] = False
        nodes.append(NodeSpec(
            name="policy_node", executable="policy_node", module="coop_transport.ros.policy_node",
            namespace=ns[arm], params_files=(params_file,), parameters=params, ros_arguments=ros_args,
            remappings=tuple(policy_remaps), required=False))
        bridge_params = {"arm": arm, "backend": backend, "robot_type": values["robot_type"]}
        if backend == "franka_ros2":
            bridge_params.update({"franka_namespace": franka_ns,
                                  "equilibrium_pose_topic": f"{controller}/equilibrium_pose"})
        else:
            bridge_params["robot_ip"] = values[f"{side}_robot_ip"]
        nodes.append(NodeSpec(
            name="franka_bridge", executable="franka_bridge_node", module="coop_transport.ros.franka_bridge_node",
            namespace=ns[arm], params_files=(params_file,), ros_arguments=ros_args, required=True,
            parameters=bridge_params))
        if backend == "franka_ros2" and _bool(values["start_franka"]):
            includes.append(IncludeSpec("franka_bringup", "launch/franka.launch.py", {
                "robot_type": values["robot_type"], "namespace": franka_ns, "robot_ip": values[f"{side}_robot_ip"],
                "load_gripper": "true", "use_fake_hardware": values["use_fake_hardware"],
                "fake_sensor_commands": "false"}))
            nodes.append(NodeSpec(
                name=f"spawner_{controller}", executable="spawner", package="controller_manager",
                namespace=franka_ns, arguments=(controller, "--controller-manager-timeout", "30")))
        if values["cameras"] == "realsense":
            cam_params = {"enable_depth": False, "enable_color": True}
            serial = values[f"{side}_camera_serial"]
            if serial:
                cam_params["serial_no"] = f"'{serial}'"  # a string even when all digits
            nodes.append(NodeSpec(name="wrist_camera", executable="realsense2_camera_node",
                                  package="realsense2_camera", namespace=ns[arm], parameters=cam_params))
        elif values["cameras"] != "none":
            raise ValueError(f"cameras must be realsense or none, got {values['cameras']!r}")
    return nodes, includes


# ------------------------------------------------------------------------------------------- launch_ros side
def launch_description(profile: str):
    """The LaunchDescription of a profile (for ``launch/<profile>.launch.py``); needs launch and launch_ros."""
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    declared = [DeclareLaunchArgument(a.name, default_value=a.default, description=a.description)
                for a in launch_arguments(profile)]
    return LaunchDescription(declared + [OpaqueFunction(function=_materialize, args=[profile])])


def _materialize(context, profile: str):
    """Launch-time half: resolve the arguments, build the graph, return launch_ros actions."""
    from launch.actions import IncludeLaunchDescription, Shutdown
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
    from launch_ros.actions import Node
    from launch_ros.parameter_descriptions import ParameterValue
    from launch_ros.substitutions import FindPackageShare

    values = {a.name: LaunchConfiguration(a.name).perform(context) for a in launch_arguments(profile)}
    graph = build_graph(profile, values)
    actions = []
    for inc in graph.includes:
        source = PythonLaunchDescriptionSource(PathJoinSubstitution([FindPackageShare(inc.package), inc.launch_file]))
        actions.append(IncludeLaunchDescription(source, launch_arguments=list(inc.arguments.items())))
    for spec in graph.nodes:
        kwargs = dict(package=spec.package, executable=spec.executable, name=spec.name, namespace=spec.namespace,
                      output="screen")
        # Strings stay strings (launch_ros would otherwise read "1.0" or "true" as YAML).
        typed = {k: ParameterValue(v, value_type=str) if isinstance(v, str) else v for k, v in spec.parameters.items()}
        parameters = list(spec.params_files) + ([typed] if typed else [])
        if parameters:
            kwargs["parameters"] = parameters
        if spec.remappings:
            kwargs["remappings"] = list(spec.remappings)
        if spec.arguments:
            kwargs["arguments"] = list(spec.arguments)
        if spec.ros_arguments:
            kwargs["ros_arguments"] = list(spec.ros_arguments)
        if spec.required:
            kwargs["on_exit"] = Shutdown(reason=f"{spec.full_name} exited")
        actions.append(Node(**kwargs))
    return actions
