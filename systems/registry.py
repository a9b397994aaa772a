from utils.registry import Registry

SYSTEMS = Registry("system")
