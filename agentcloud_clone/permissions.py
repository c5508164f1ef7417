"""Team roles and the permission bits each one grants."""

from __future__ import annotations

from enum import IntFlag


class Permission(IntFlag):
    """What a team member may do; a role is a set of these."""

    SESSION_VIEW = 1 << 0
    SESSION_CREATE = 1 << 1
    SESSION_CANCEL = 1 << 2
    SESSION_DELETE = 1 << 3
    APP_VIEW = 1 << 4
    APP_MANAGE = 1 << 5
    TEAM_MANAGE = 1 << 6


_VIEWER = Permission.SESSION_VIEW | Permission.APP_VIEW
_MEMBER = _VIEWER | Permission.SESSION_CREATE | Permission.SESSION_CANCEL | Permission.SESSION_DELETE
_ADMIN = _MEMBER | Permission.APP_MANAGE | Permission.TEAM_MANAGE

ROLE_PERMISSIONS: dict[str, Permission] = {
    "viewer": _VIEWER,
    "member": _MEMBER,
    "admin": _ADMIN,
    "owner": _ADMIN,
}
ROLES = tuple(ROLE_PERMISSIONS)


def permissions_for(role: str) -> Permission:
    """The permission bits of `role`; an unknown role grants nothing."""
    return ROLE_PERMISSIONS.get(role, Permission(0))
