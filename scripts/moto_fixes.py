"""Where moto (the AWS emulator rigger's tests and lab run against) differs from AWS in a way
rigger's AWS-correct code trips on, this makes it behave as AWS does. Installed into moto's
venv by scripts/moto.sh and loaded at interpreter start (a .pth file); docs/aws.md lists the
emulator's quirks, these and the ones handled in rigger's own code.

1. CreateLaunchTemplateVersion keeps its UserData as a plain string (CreateLaunchTemplate
   wraps it), and launching from such a version fails an assertion: SetDesiredCapacity
   answers 500. AWS launches from it. Found in the lab: a group after `rigger db promote`
   (which gives the launch templates a version pointing at the new primary) could not scale.
"""


def _user_data_as_aws_keeps_it():
    from moto.core.types import Base64EncodedString
    from moto.ec2.models.launch_templates import LaunchTemplateVersion
    from moto.ec2.utils import parse_user_data

    def user_data(self):
        value = self.data.get("UserData")
        if value is not None and not isinstance(value, Base64EncodedString):
            value = parse_user_data(value)
            self.data["UserData"] = value
        return value

    LaunchTemplateVersion.user_data = property(user_data)


def apply():
    try:
        _user_data_as_aws_keeps_it()
    except ImportError:
        # moto is not installed yet (pip runs in this venv too).
        pass
