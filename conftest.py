# The plugin itself is loaded through its pytest11 entry point (pip install -e .).
# Its own tests drive it through pytester.
pytest_plugins = ["pytester"]
