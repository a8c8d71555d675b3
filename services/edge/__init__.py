"""The WebRTC edge: browsers (and OBS, GStreamer) publish over WHIP and watch over WHEP."""
