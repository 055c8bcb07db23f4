pytest_plugins = [
    "tests.hub.fixtures",
]
