"""flowshift: stateful network-service offload from guest to VNIC to SmartNIC, flow by flow."""

__version__ = "0.1.0"
