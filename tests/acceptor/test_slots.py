"""The SMTP session has __slots__ (its attributes are read on every event): every
attribute the acceptor's code gives a session must be one of them, or that code path
fails with AttributeError.  Read from the source, so that a path no test reaches is
checked too."""
import ast
import pathlib

from mta.acceptor import smtp

ACCEPTOR = pathlib.Path(smtp.__file__).parent


def _stored(tree: ast.AST, names: tuple[str, ...]) -> set[str]:
    """The attributes assigned on the variables *names* anywhere in *tree*."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name) and node.value.id in names}


def test_every_attribute_given_to_a_session_has_a_slot():
    tree = ast.parse((ACCEPTOR / "smtp.py").read_text())
    [session] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session"]
    given = _stored(session, ("self",))
    # The modules that act on a session from outside (STARTTLS, AUTH, PROXY, closing).
    for name in ("tls_auth.py", "proxy.py", "closing.py"):
        given |= _stored(ast.parse((ACCEPTOR / name).read_text()), ("session",))
    assert given, "nothing found: the test reads the wrong files"
    assert given <= set(smtp.Session.__slots__), given - set(smtp.Session.__slots__)
    assert not hasattr(smtp.Session(_Acceptor()), "__dict__")


class _Acceptor:
    """What Session.__init__ reads of its acceptor."""

    class smtp:
        max_command_line = max_text_line = max_message_size = 1000

    class loop:
        time = staticmethod(lambda: 0.0)

    from mta._pure import scanner as scanner_mod
