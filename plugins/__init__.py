"""Built-in optin plugins. They register through the same entry points a third-party package uses."""
