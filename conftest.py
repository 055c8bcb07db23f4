pytest_plugins = [
    "tests.rigs.fixtures",
    "tests.hub.fixtures",
    "tests.fixtures.llama_fixtures",
    "tests.fixtures.llama_rig",
    "tests.fixtures.wheelhouse",
]
