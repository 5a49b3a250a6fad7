"""``scd-play``: steer a trained model live in a browser tab (an application on the streaming API).

``session`` holds the model and its live stream (one frame per tick), ``server`` serves the page in
``static/`` and a WebSocket to it, ``cli`` is the command. Nothing else in scd-train imports this.
"""
