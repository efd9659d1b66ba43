/* The FUSE protocol's floor on this machine: the smallest daemon there is.
 *
 * One directory holding one file "f"; attributes are never cached (attr_timeout 0), so every
 * stat(2) of the file is one GETATTR round trip through the kernel to this daemon and back.
 * libfuse's low-level API, one thread (fuse_session_loop), no work in the handler: what is
 * left is the cost of a request itself, which no daemon in any language can go under.
 * Built and run by fuse_floor_bench.py:  fuse_floor MOUNTPOINT  (prints "ready" once mounted).
 */
#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static struct stat root_attr, file_attr;

static void floor_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param entry;

	if (parent != FUSE_ROOT_ID || strcmp(name, "f") != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&entry, 0, sizeof(entry));
	entry.ino = 2;
	entry.attr = file_attr;
	entry.attr_timeout = 0;
	entry.entry_timeout = 86400;
	fuse_reply_entry(req, &entry);
}

static void floor_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	fuse_reply_attr(req, ino == FUSE_ROOT_ID ? &root_attr : &file_attr, 0);
}

static const struct fuse_lowlevel_ops operations = {
	.lookup = floor_lookup,
	.getattr = floor_getattr,
};

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_session *session;
	int ret;

	if (argc != 2) {
		fprintf(stderr, "usage: fuse_floor MOUNTPOINT\n");
		return 2;
	}
	root_attr.st_ino = FUSE_ROOT_ID;
	root_attr.st_mode = S_IFDIR | 0755;
	root_attr.st_nlink = 2;
	file_attr.st_ino = 2;
	file_attr.st_mode = S_IFREG | 0644;
	file_attr.st_nlink = 1;
	file_attr.st_size = 4096;
	root_attr.st_mtime = file_attr.st_mtime = time(NULL);

	fuse_opt_add_arg(&args, "fuse_floor");
	session = fuse_session_new(&args, &operations, sizeof(operations), NULL);
	if (session == NULL || fuse_set_signal_handlers(session) != 0)
		return 1;
	if (fuse_session_mount(session, argv[1]) != 0)
		return 1;
	printf("ready\n");
	fflush(stdout);
	ret = fuse_session_loop(session);
	fuse_remove_signal_handlers(session);
	fuse_session_unmount(session);
	fuse_session_destroy(session);
	return ret ? 1 : 0;
}
