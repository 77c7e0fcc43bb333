"""Read settings from an INI file, with defaults and type conversion."""

import configparser
import os

DEFAULTS = {"host": "localhost", "port": "8080", "debug": "false", "workers": "2"}


class Settings:
    def __init__(self, path=None):
        self.parser = configparser.ConfigParser()
        self.parser.read_dict({"server": DEFAULTS})
        if path is not None and os.path.exists(path):
            self.parser.read(path, encoding="utf-8")

    @property
    def host(self):
        return self.parser.get("server", "host")

    @property
    def port(self):
        port = self.parser.getint("server", "port")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        return port

    @property
    def debug(self):
        return self.parser.getboolean("server", "debug")

    @property
    def workers(self):
        return max(1, self.parser.getint("server", "workers"))

    def as_dict(self):
        return {"host": self.host, "port": self.port, "debug": self.debug, "workers": self.workers}
