"""Remote inference over openpi's websocket protocol: the policy server (``server.py``, started by
``python -m coop_transport.serve``), the wire format and observation keys (``protocol.py``) and the client that the
ROS policy node and the evaluator use in remote mode (``client.py``). Clients may equally be openpi's own
``openpi_client.WebsocketClientPolicy``."""
