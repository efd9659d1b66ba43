"""The hostile-job battery (issue 11): each test is an attack a clever job would try, run on
every engine where it applies, bounded in time and count, and it cleans up after itself."""
