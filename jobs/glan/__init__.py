"""The paper's own logic, as pure functions: the taxonomy of human knowledge and concept sampling."""
