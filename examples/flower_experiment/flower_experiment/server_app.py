"""ServerApp: warm-up, the client tree, personalised experts per client (fedtreelora.flower.server_app)."""
from fedtreelora.flower.server_app import app

__all__ = ["app"]
