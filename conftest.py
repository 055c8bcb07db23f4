pytest_plugins = [
    "tests.hub.fixtures",
    "tests.fixtures.llama_fixtures",
]
