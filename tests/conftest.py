"""pytest configuration shared by every test folder.

Helpers that tests import live in :mod:`tests.helpers`; the textbook reference
implementations in :mod:`tests.textbook`.  Every test folder is a package
(``__init__.py``), so same-named test files in different folders do not clash.
"""
